"""The store in a child process of its own, so that what costs milliseconds of CPU (DuckDB's
commits, users' SQL) never holds the serving process's GIL: the proxy only pickles ops and
results over a socket, and waits for them with the GIL released.

The child is a `multiprocessing.managers.BaseManager` server, started with `spawn` (the parent
is an asyncio server with threads: a fork would copy their locks mid-use; a program that starts
one must do so under `if __name__ == "__main__":`, as spawn re-imports its main module). Each
parent thread gets a connection of its own and the child a thread per connection, so a slow
query never holds up the writer. What is added to the manager, and why:

- Every method of the child's `_StoreHost` returns the store's exception as a value
  (`_Raised`), which the parent raises again, type and attributes kept. The manager would
  raise it itself, but then an OSError of the store's (StoreUnreachable is one) could not be
  told from a broken connection, the one error the parent handles here. The store is opened by
  a method call too: an error in the manager's own start-up would come back as text only.
- A broken connection means the child is lost: the parent kills what is left of it (so the
  DuckDB file's lock goes with it), raises StoreProcessLost (a StoreUnavailable: the writer
  keeps its batch and retries) and starts another child on the next call. The lost batch may
  have been committed: the retry leaves out the calls already stored (`_apply_again`).
- Ops go pickled one by one (`StoreProcess.encode`, which BatchWriter calls as it queues them),
  so that no batch is pickled whole on the writer thread, holding the GIL for milliseconds.
- The child ignores SIGTERM (a stop signalled to the whole process group reaches it too: the
  parent still has to write what is queued), exits when its parent does, even by kill -9, and
  caps its own address space (memory_headroom_mb), since DuckDB's memory is its own now.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import pickle
import resource
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.managers import BaseManager, BaseProxy
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Sequence

from flywheel.store import open_store
from flywheel.store.base import StoreBase
from flywheel.store.records import CallRecord, StoreOp, StoreUnavailable

if TYPE_CHECKING:
    from flywheel.store.db import StoreLimits

log = logging.getLogger("flywheel.store")

_SPAWN = multiprocessing.get_context("spawn")
_EXIT_S = 5.0  # how long a child that was told to exit, or killed, gets to be gone
_RESTART_EVERY_S = 1.0  # at most one start of a lost child's successor this often: each costs a process
_LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"  # as the `flywheel` commands log


class StoreProcessLost(StoreUnavailable):
    """The store's child process died, or the connection to it broke: whatever it was asked has
    an unknown outcome, and another child is started on the next call."""


# ---- the child's side --------------------------------------------------------


@dataclass(frozen=True)
class _Raised:
    """An exception of the store's, sent back as a value (see the module's doc)."""

    error: Exception
    child_traceback: str

    def reraise(self) -> NoReturn:
        raise self.error from _ChildTraceback(self.child_traceback)


class _ChildTraceback(Exception):
    """Where in the store process the exception it caused was raised."""


def _errors_returned(method: Callable) -> Callable:
    """`method`, returning its exception as a `_Raised` instead of raising it."""

    @functools.wraps(method)
    def returning(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except Exception as error:
            return _Raised(error, traceback.format_exc())

    return returning


class _StoreHost:
    """The one store of the child, opened by the parent's first call, so that an error opening
    it reaches the parent as itself."""

    def __init__(self):
        self._store: StoreBase | None = None

    @_errors_returned
    def open(self, db: str, limits: StoreLimits | None, memory_headroom_mb: int) -> tuple[bool, int]:
        """Open the store `db` names; its `shared`, and this process's id."""
        self._store = open_store(db, limits=limits)
        if memory_headroom_mb:
            cap_address_space(memory_headroom_mb)
        return self._store.shared, os.getpid()

    @_errors_returned
    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        return getattr(self._store, method)(*args, **kwargs)

    @_errors_returned
    def apply(self, encoded: list[bytes], reply_lost: bool) -> list[Any]:
        """`StoreBase.apply` of the ops `StoreProcess.encode` pickled; `reply_lost`: the last
        apply's reply never came (`_apply_again`)."""
        ops = [pickle.loads(op) for op in encoded]
        return _apply_again(self._store, ops) if reply_lost else self._store.apply(ops)


def _apply_again(store: StoreBase, ops: list[StoreOp]) -> list[Any]:
    """`store.apply(ops)` for ops a lost child may have committed already, all of them (it died
    between commit and reply) or some (it died in the one-by-one pass). Every op lands once
    when applied again (ids and ON CONFLICT) except a call on DuckDB, which keeps no unique
    call ids: the calls already stored are left out here, their result None as a call's is."""
    call_ids = [op.call_id for op in ops if isinstance(op, CallRecord)]
    # _dicts: StoreBase's read of plain rows, which both stores implement; no public read answers this
    found = store._dicts("SELECT call_id FROM calls WHERE call_id IN (SELECT unnest(?::VARCHAR[]))",
                         [call_ids]) if call_ids else []
    stored = {row["call_id"] for row in found}
    if not stored:
        return store.apply(ops)
    fresh = [op for op in ops if not _is_stored(op, stored)]
    try:
        return _spread(ops, stored, store.apply(fresh))
    except StoreUnavailable as unavailable:
        raise StoreUnavailable(str(unavailable), _spread(ops, stored, unavailable.committed)) from unavailable


_NO_RESULT = object()


def _is_stored(op: StoreOp, stored: set[str]) -> bool:
    return isinstance(op, CallRecord) and op.call_id in stored


def _spread(ops: list[StoreOp], stored: set[str], fresh_results: list[Any]) -> list[Any]:
    """The results of `ops`' first ops, from those of its fresh ones (all, or the first ones when
    the store stopped partway): None for a stored call, up to the first fresh op without one."""
    results: list[Any] = []
    fresh = iter(fresh_results)
    for op in ops:
        if _is_stored(op, stored):
            results.append(None)
            continue
        result = next(fresh, _NO_RESULT)
        if result is _NO_RESULT:
            break
        results.append(result)
    return results


def cap_address_space(headroom_mb: int) -> None:
    """RLIMIT_AS at this process's size now plus `headroom_mb`, for a process DuckDB runs in.

    DuckDB counts buffer-managed memory against its memory_limit, but not the strings a
    query builds while evaluating expressions: `md5(repeat(x, 2000000))` over a few thousand
    rows grew the proxy to 22 GB in 20 s and the kernel killed it. Past this cap the
    allocation fails, DuckDB raises OutOfMemory for that query, and the process serves on.
    """
    try:
        with open("/proc/self/statm") as statm:  # total program size, in pages
            size = int(statm.read().split()[0]) * resource.getpagesize()
    except OSError:
        log.warning("no /proc/self/statm: this process's address space is not capped (memory_headroom_mb)")
        return
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    limit = size + (headroom_mb << 20)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))  # a restarted child inherits the parent's: raised here
    log.info("address space capped at %.1f GB (%.1f GB now + memory_headroom_mb)", limit / 2**30, size / 2**30)


def _prepare_child(log_level: int) -> None:
    """The child's set-up before it serves (BaseManager already ignores SIGINT in it)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=_LOG_FORMAT)  # to the stderr it shares with its parent
    threading.Thread(target=_exit_with_parent, name="flywheel-store-parent-watch", daemon=True).start()


def _exit_with_parent() -> None:
    """Exit once the parent is gone: nobody is left to ask, and the DuckDB file's lock must go,
    so that the proxy started after a kill -9 can open it."""
    multiprocessing.parent_process().join()
    os._exit(1)


class _HostProxy(BaseProxy):
    """The parent's handle on the child's `_StoreHost`."""

    _exposed_ = ("open", "call", "apply")

    def open(self, *args) -> Any:
        return self._callmethod("open", args)

    def call(self, *args) -> Any:
        return self._callmethod("call", args)

    def apply(self, *args) -> Any:
        return self._callmethod("apply", args)


class _StoreManager(BaseManager):
    """The child process: a manager server holding one `_StoreHost`."""


_StoreManager.register("StoreHost", _StoreHost, _HostProxy)


# ---- the parent's side -------------------------------------------------------


@dataclass(frozen=True)
class _Child:
    manager: _StoreManager
    host: _HostProxy
    shared: bool  # the store's
    pid: int

    def stop(self) -> None:
        """Tell it to exit; the manager kills it if it is still there after twice `_EXIT_S` (the
        first wait, then the SIGTERM it ignores)."""
        self.manager.shutdown()

    def kill(self) -> None:
        # active_children: the manager's Process object, by public means; it reaps the dead ones,
        # so a child listed is alive and its pid still its own
        for process in multiprocessing.active_children():
            if process.pid == self.pid:
                process.kill()
        self.manager.join(_EXIT_S)
        self.manager.shutdown()


class _InChild:
    """A read of `StoreBase`'s (its name and doc), run in the child."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.__doc__ = getattr(StoreBase, name).__doc__

    def __get__(self, process: StoreProcess | None, owner: type | None = None) -> Any:
        return self if process is None else functools.partial(process._call, self.name)


class StoreProcess:
    """The store `db` names (`open_store`), run in a child process: StoreBase's interface, each
    call sent to the child and answered there, from any number of threads at once. An error
    opening the store is raised here, at start, as itself."""

    def __init__(self, db: str, limits: StoreLimits | None = None, memory_headroom_mb: int = 0):
        self._open_args = (db, limits, memory_headroom_mb)
        self._lock = threading.Lock()  # guards the child's replacement
        self._next_restart = 0.0
        self._closed = False
        self._reply_lost = False  # the last apply's reply never came: it may have been committed
        self._child: _Child | None = self._start()
        self.shared = self._child.shared  # read by the proxy: whether other proxies write the store too

    query = _InChild()
    query_json = _InChild()
    summaries_json = _InChild()
    episode = _InChild()
    episodes_to_push = _InChild()
    episodes_to_grade = _InChild()
    episodes_with_calls = _InChild()
    episodes_with_metadata = _InChild()
    expired_episodes = _InChild()
    episodes_with_old_content = _InChild()
    shadow_origin = _InChild()
    version_rewards = _InChild()
    adapter_rows = _InChild()
    adapters_changed_at = _InChild()
    try_lock = _InChild()

    @property
    def pid(self) -> int | None:
        """The child's process id; None while a lost one has no successor yet."""
        child = self._child
        return child.pid if child else None

    @staticmethod
    def encode(op: StoreOp) -> bytes:
        """`op` as `apply` sends it. BatchWriter encodes each op as it is queued, on the event loop
        (~10 µs for a call), so that no batch is pickled whole on the writer thread: ~6 ms for
        512 calls, all of it holding the GIL (measured: p99 event-loop lag 2.5 ms, not 0.4)."""
        return pickle.dumps(op, pickle.HIGHEST_PROTOCOL)

    def apply(self, ops: Sequence[StoreOp | bytes]) -> list[Any]:
        """`StoreBase.apply` of `ops` (some or all `encode`d already), in the child. Raises
        StoreProcessLost if the child was lost meanwhile; the batch may then have been committed,
        so the calls the next batch finds stored are not written again (`_apply_again`)."""
        encoded = [op if isinstance(op, bytes) else self.encode(op) for op in ops]
        try:
            results = self._ask(lambda host: host.apply(encoded, self._reply_lost))
        except StoreProcessLost:
            self._reply_lost = True
            raise
        self._reply_lost = False
        return results

    def close(self, timeout_s: float = 60.0) -> None:
        """Close the store (DuckDB writes its file out) and stop the child, killed if closing takes
        longer than `timeout_s`."""
        with self._lock:
            child, self._child, self._closed = self._child, None, True
        if child is None:
            return
        closing = threading.Thread(target=self._close_store, args=(child,), name="flywheel-store-close", daemon=True)
        closing.start()
        closing.join(timeout_s)
        if closing.is_alive():
            log.error("the store process did not close its store within %g s: killing it", timeout_s)
            child.kill()
        else:
            child.stop()

    def _start(self) -> _Child:
        """A new child with the store open; raises the store's open error, or StoreProcessLost."""
        manager = _StoreManager(ctx=_SPAWN, shutdown_timeout=_EXIT_S)
        try:
            manager.start(_prepare_child, (log.getEffectiveLevel(),))
        except (EOFError, OSError) as failed:
            raise StoreProcessLost(f"the store process did not start ({failed!r})") from None
        try:
            host = manager.StoreHost()
            opened = host.open(*self._open_args)
        except (EOFError, OSError) as broken:
            manager.shutdown()
            raise StoreProcessLost(f"the store process stopped while opening the store ({broken!r})") from None
        if isinstance(opened, _Raised):
            manager.shutdown()
            opened.reraise()
        return _Child(manager, host, *opened)

    def _call(self, method: str, *args, **kwargs) -> Any:
        return self._ask(lambda host: host.call(method, args, kwargs))

    def _ask(self, ask: Callable[[_HostProxy], Any]) -> Any:
        """What `ask` gets from the child's host, its `_Raised` raised; StoreProcessLost if the
        connection broke."""
        child = self._running_child()
        try:
            outcome = ask(child.host)
        except (EOFError, OSError) as broken:  # never the store's own error: those come as _Raised
            self._lose(child, broken)
            raise StoreProcessLost(f"the store process stopped ({broken!r}); another is started") from None
        if isinstance(outcome, _Raised):
            outcome.reraise()
        return outcome

    def _running_child(self) -> _Child:
        """The child, or a successor to a lost one."""
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the store is closed")
            if self._child is None:
                self._child = self._successor()
            return self._child

    def _successor(self) -> _Child:
        """A new child in a lost one's place; StoreUnavailable if it cannot start now."""
        if time.monotonic() < self._next_restart:
            raise StoreUnavailable("the store process was lost; another is started within a second")
        self._next_restart = time.monotonic() + _RESTART_EVERY_S
        try:
            child = self._start()
        except Exception as failed:
            raise StoreUnavailable(f"the store process could not start again: {failed}") from failed
        log.warning("store process started again (pid %d)", child.pid)
        return child

    def _lose(self, child: _Child, broken: Exception) -> None:
        """Kill what is left of `child` (once, whichever thread finds it lost first), so that its
        successor can take the store. Any broken connection loses the child, even if it still
        runs: the manager would keep handing the broken connection to the calling thread."""
        with self._lock:
            if self._child is not child:
                return
            log.error("store process %d lost (%r): starting another", child.pid, broken)
            self._child = None
            child.kill()

    @staticmethod
    def _close_store(child: _Child) -> None:
        try:
            outcome = child.host.call("close", (), {})
        except (EOFError, OSError) as broken:
            log.error("store process %d lost while closing its store (%r)", child.pid, broken)
            return
        if isinstance(outcome, _Raised):
            log.error("store process %d failed to close its store: %s\n%s", child.pid, outcome.error,
                      outcome.child_traceback)
