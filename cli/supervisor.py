"""`flywheel up`: vLLM, the proxy (and the learner) as supervised child processes.

Each child runs in its own process group, so a terminal's Ctrl-C reaches only the
supervisor, which then stops the children in order (proxy first, so its store is
flushed, then vLLM) and waits for them; on Linux the children are also told to die if
the supervisor is killed outright, and the supervisor is a child subreaper: vLLM's
workers start their own sessions, and when vLLM dies abruptly they are orphaned to us,
so we can find and stop them too. Their output is forwarded line by line with a
`[name]` prefix. If a child exits on its own, the supervisor stops the rest and exits
non-zero, quoting the child's last lines.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field


class ChildDied(RuntimeError):
    pass


_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36


def _prctl(option: int, value: int) -> None:
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _orphans() -> list[int]:
    """Processes re-parented to us (we are their subreaper) that we did not start."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc") if sys.platform == "linux" else ():
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                found.append(int(entry))
    return found


@dataclass
class Child:
    name: str
    argv: list[str]
    ready_url: str  # http://... answers 200, or tcp://host:port accepts, once the child serves
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    stop_grace_s: float = 30.0  # from SIGTERM to SIGKILL
    proc: subprocess.Popen | None = None
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=30))

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def ready(self) -> bool:
        if self.ready_url.startswith("tcp://"):
            host, port = self.ready_url[len("tcp://"):].rsplit(":", 1)
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
                return True
            except OSError:
                return False
        try:
            with urllib.request.urlopen(self.ready_url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def death_message(self) -> str:
        lines = "\n".join(f"  {line}" for line in self.tail)
        return f"{self.name} exited unexpectedly with code {self.proc.returncode}; its last lines:\n{lines}"


class Supervisor:
    def __init__(self, out=None, adopt_orphans: bool = False):
        """`adopt_orphans`: become this process's child subreaper (for a process that only supervises)."""
        self.out = out or sys.stdout
        self.children: list[Child] = []
        self.stopping = threading.Event()
        self._print_lock = threading.Lock()
        self._forwarders: list[threading.Thread] = []
        self.adopt_orphans = adopt_orphans
        if adopt_orphans:
            _prctl(_PR_SET_CHILD_SUBREAPER, 1)

    def say(self, message: str, name: str = "up") -> None:
        with self._print_lock:
            self.out.write(f"[{name}] {message}\n")
            self.out.flush()

    def start(self, child: Child) -> Child:
        child.proc = subprocess.Popen(
            child.argv, env=child.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        self.children.append(child)
        forwarder = threading.Thread(target=self._forward, args=(child,), daemon=True, name=f"log-{child.name}")
        forwarder.start()
        self._forwarders.append(forwarder)
        self.say(f"started {child.name} (pid {child.proc.pid})")
        return child

    def _forward(self, child: Child) -> None:
        for raw in child.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            child.tail.append(line)
            self.say(line, child.name)

    def wait_ready(self, child: Child, timeout_s: float, what: str) -> None:
        started = time.monotonic()
        next_note = started + 10
        while not child.ready():
            if child.exited() is not None:
                raise ChildDied(child.death_message())
            if self.stopping.is_set():
                raise KeyboardInterrupt
            now = time.monotonic()
            if now - started > timeout_s:
                raise ChildDied(f"{child.name} was not ready after {timeout_s:.0f} s")
            if now >= next_note:
                self.say(f"waiting for {what}… {now - started:.0f} s")
                next_note = now + 10
            time.sleep(0.25)
        self.say(f"{child.name} ready after {time.monotonic() - started:.1f} s")

    def watch(self) -> None:
        """Return when asked to stop; raise ChildDied when a child exits on its own."""
        while not self.stopping.wait(0.25):
            for child in self.children:
                if child.exited() is not None:
                    raise ChildDied(child.death_message())

    def stop_all(self) -> None:
        for child in reversed(self.children):  # last started first: the proxy before vLLM
            if child.exited() is None:
                self.say(f"stopping {child.name}")
                _signal_group(child, signal.SIGTERM)
                try:
                    child.proc.wait(child.stop_grace_s)
                except subprocess.TimeoutExpired:
                    self.say(f"{child.name} did not stop in {child.stop_grace_s:.0f} s; killing it")
                    _signal_group(child, signal.SIGKILL)
                    child.proc.wait(10)
            _signal_group(child, signal.SIGKILL)  # anything its process group left behind
        ours = {c.proc.pid for c in self.children}
        # only a subreaper's orphans are its own: in a process that also runs other children
        # (another Supervisor's, a test's), a child we did not start is not ours to kill
        for pid in _orphans() if self.adopt_orphans else ():
            if pid not in ours:
                self.say(f"stopping orphaned process {pid}")
                _kill_and_reap(pid, grace_s=10)
        for forwarder in self._forwarders:  # the children's last lines, before `out` may be closed
            forwarder.join(timeout=5)

    def handle_signals(self) -> None:
        def stop(signum, frame):
            if not self.stopping.is_set():
                self.say(f"{signal.Signals(signum).name}: shutting down")
            self.stopping.set()

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)


def _kill_and_reap(pid: int, grace_s: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                return
            time.sleep(0.1)


def _signal_group(child: Child, sig: int) -> None:
    try:
        os.killpg(child.proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
