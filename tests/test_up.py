"""`flywheel up`: supervised children, clean Ctrl-C, and a clear non-zero exit when a child dies."""

import asyncio
import signal
import subprocess
import sys

import openai
import psutil
import pytest

from tests.conftest import free_port


class Up:
    """`flywheel up` as a user runs it, its output collected to a file."""

    def __init__(self, tmp_path, *args):
        self.port = free_port()
        self.log = tmp_path / "up.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flywheel", "up", "--port", str(self.port), "--db", str(tmp_path / "up.duckdb"), *args],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        self.descendants: list[psutil.Process] = []

    @property
    def output(self) -> str:
        return self.log.read_text()

    async def wait_for(self, text: str, timeout_s: float) -> None:
        for _ in range(int(timeout_s / 0.1)):
            if text in self.output:
                self.descendants = psutil.Process(self.proc.pid).children(recursive=True)
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"flywheel up exited early:\n{self.output}")
            await asyncio.sleep(0.1)
        raise AssertionError(f"no {text!r} after {timeout_s} s:\n{self.output}")

    async def exit_code(self, timeout_s: float = 60) -> int:
        for _ in range(int(timeout_s / 0.1)):
            if self.proc.poll() is not None:
                return self.proc.returncode
            await asyncio.sleep(0.1)
        self.proc.kill()
        raise AssertionError(f"flywheel up did not exit:\n{self.output}")

    def leftovers(self) -> list[psutil.Process]:
        alive = []
        for p in self.descendants:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        return alive

    def child(self, fragment: str) -> psutil.Process:
        return next(p for p in self.descendants if fragment in " ".join(p.cmdline()))


async def call(port: int, model: str = "m") -> str:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/agents/a/v1", api_key="x", max_retries=0)
    reply = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    return reply.choices[0].message.content


async def test_ctrl_c_stops_the_proxy_and_leaves_no_child(tmp_path, upstream):
    up = Up(tmp_path, "--upstream", upstream.url, "--no-learner")
    await up.wait_for("Flywheel is up", 60)
    assert await call(up.port) == " w0 w1 w2 w3"
    assert up.descendants
    up.proc.send_signal(signal.SIGINT)
    assert await up.exit_code() == 0
    assert up.leftovers() == []
    assert "stopping proxy" in up.output


async def test_a_dying_child_is_reported_and_up_exits_non_zero(tmp_path, upstream):
    up = Up(tmp_path, "--upstream", upstream.url, "--no-learner")
    await up.wait_for("Flywheel is up", 60)
    up.child("serve").kill()
    assert await up.exit_code() == 1
    assert "proxy exited unexpectedly with code -9" in up.output


@pytest.mark.vllm
async def test_vllm_that_cannot_start_is_reported(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    up = Up(tmp_path, "--model", str(broken), "--vllm-port", str(free_port()))
    assert await up.exit_code(300) == 1
    assert "vllm exited unexpectedly with code" in up.output and "its last lines" in up.output


@pytest.mark.vllm
async def test_real_stack_serves_then_ctrl_c_leaves_no_child(tmp_path, smollm2):
    vllm_port = free_port()
    up = Up(tmp_path, "--model", smollm2, "--served-name", "smollm2", "--vllm-port", str(vllm_port))
    await up.wait_for("Flywheel is up", 600)
    assert isinstance(await call(up.port, "smollm2"), str)
    vllm = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{vllm_port}/v1", api_key="a-guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError):  # vLLM itself answers only the proxy, which holds its key
        await vllm.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert len(up.descendants) >= 3  # vLLM, its engine core, the proxy
    up.proc.send_signal(signal.SIGINT)
    assert await up.exit_code(120) == 0
    assert up.leftovers() == []


@pytest.mark.vllm
async def test_vllm_crash_is_reported_and_everything_stops(tmp_path, smollm2):
    up = Up(tmp_path, "--model", smollm2, "--served-name", "smollm2", "--vllm-port", str(free_port()))
    await up.wait_for("Flywheel is up", 600)
    up.child("vllm.entrypoints").kill()
    assert await up.exit_code(120) == 1
    assert "vllm exited unexpectedly with code -9" in up.output
    assert up.leftovers() == []


def test_a_supervisor_that_is_no_subreaper_leaves_other_children_alone(tmp_path):
    from flywheel.supervisor import Supervisor

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # not the supervisor's
    try:
        Supervisor(open(tmp_path / "out.log", "w")).stop_all()
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
