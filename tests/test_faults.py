"""Faults, with real processes: the upstream killed mid-stream and restarted, the proxy killed
with -9, the store's disk full. In each, a clear error where one is due, nothing acknowledged
lost, and service back once the fault is gone."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request

import openai
import pytest

from flywheel.learner.config import LearnerConfig
from tests.conftest import ServeProcess, eventually, free_port, wait_buffered
from tests.test_adapters import adapter_dir
from tests.test_feedback import api
from tests.test_learner_service import TINY_TRAINER, tiny_model  # noqa: F401 (a fixture)

MESSAGES = [{"role": "user", "content": "hello"}]


class FakeUpstreamProcess:
    """tests/fake_upstream.py in a process of its own, so it can be killed and started again on its port."""

    def __init__(self, port: int, log_path):
        self.port, self.log_path = port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    async def start(self) -> "FakeUpstreamProcess":
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fake_upstream", "--port", str(self.port)],
                                     stdout=self.log_path.open("a"), stderr=subprocess.STDOUT)
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{self.url}/v1/models", timeout=1).close()
                return self
            except OSError:
                await asyncio.sleep(0.1)
        raise AssertionError(f"fake upstream did not start:\n{self.log_path.read_text()}")

    def models(self) -> list[str]:
        with urllib.request.urlopen(f"{self.url}/v1/models", timeout=5) as response:
            return [m["id"] for m in json.load(response)["data"]]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
async def fake_upstream_process(tmp_path):
    process = FakeUpstreamProcess(free_port(), tmp_path / "upstream.log")
    yield await process.start()
    if process.proc.poll() is None:
        process.kill()


async def test_upstream_killed_mid_stream_then_restarted(fake_upstream_process, tmp_path):
    upstream = fake_upstream_process
    roots = tmp_path / "adapters"
    roots.mkdir()
    (tmp_path / "proxy").mkdir()
    served = await ServeProcess(tmp_path / "proxy", upstream.url, adapter_roots=str(roots),
                                adapter_check_s=0.2).ready()
    try:
        assert (await api(served, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(roots)}))[0] == 201
        client = openai.AsyncOpenAI(base_url=f"{served.url}/agents/s/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True, max_tokens=20,
                                                      extra_body={"fake_chunk_delay_ms": 200})
        chunks = aiter(stream)
        await anext(chunks)
        upstream.kill()  # vLLM dies while generating
        with pytest.raises(openai.APIError, match="upstream stream broke"):  # a clean error in the stream
            async for _ in chunks:
                pass
        status, body = await api(served, "POST", "/v1/sql", {"query": "SELECT status, error FROM calls"})
        [[call_status, error]] = body["rows"]
        assert call_status == 502 and "upstream stream broke" in error  # recorded, with what happened
        with pytest.raises(openai.APIStatusError) as down:
            await client.chat.completions.create(model="m", messages=MESSAGES)
        assert down.value.status_code == 502
        assert (await api(served, "GET", "/readyz"))[0] == 503

        await upstream.start()  # a fresh vLLM on the same port: no adapters loaded
        await eventually(lambda: asyncio.to_thread(lambda: "s-v1" in upstream.models()), 10, "adapter reloaded", 0.1)
        reply = await client.chat.completions.create(model="m", messages=MESSAGES)
        assert reply.model == "s-v1" and (await api(served, "GET", "/readyz"))[0] == 200
    finally:
        served.stop()


async def test_proxy_killed_with_9_loses_no_acknowledged_feedback_and_the_learner_gets_no_duplicate(
        start_learner, fake_upstream_process, tiny_model, tmp_path):  # noqa: F811
    address = f"127.0.0.1:{free_port()}"
    config = LearnerConfig(model=tiny_model, listen=address, state_dir=str(tmp_path / "learner"),
                           min_episodes=10**6, trainer=TINY_TRAINER)
    learner = await start_learner(config, tiny_model)
    (tmp_path / "proxy").mkdir()
    settings = dict(learner=address, push_after_s=0, push_interval_s=0.05)
    acknowledged: list[str] = []

    async def episodes(served: ServeProcess, first: int, count: int) -> None:
        client = openai.AsyncOpenAI(base_url=f"{served.url}/agents/solver/v1", api_key="x", max_retries=0)
        for n in range(first, first + count):
            episode = f"ep-{n}"
            await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3,
                                                 extra_headers={"X-Flywheel-Episode": episode})
            status, _ = await api(served, "POST", f"/v1/episodes/{episode}/feedback", {"reward": n % 2})
            assert status == 200
            acknowledged.append(episode)

    served = await ServeProcess(tmp_path / "proxy", fake_upstream_process.url, batch_linger_ms=200,
                                **settings).ready()
    await episodes(served, 0, 12)
    # a call older than batch_linger_ms is committed by the time of a kill: the loss window is that long
    client = openai.AsyncOpenAI(base_url=f"{served.url}/agents/solver/v1", api_key="x", max_retries=0)
    await client.chat.completions.create(model="m", messages=MESSAGES, extra_headers={"X-Flywheel-Episode": "late"})
    await asyncio.sleep(0.6)
    os.kill(served.proc.pid, signal.SIGKILL)  # pushes still in flight
    served.proc.wait(10)
    served = await ServeProcess(tmp_path / "proxy", fake_upstream_process.url, **settings).ready()
    try:
        await episodes(served, 12, 6)
        await wait_buffered(learner, 18)
        assert sorted(learner.learner.buffer.pending) == sorted(acknowledged)  # each once, none lost
        status, body = await api(served, "POST", "/v1/sql", {
            "query": "SELECT count(*) FROM episodes e WHERE reward IS NOT NULL AND pushed_at IS NOT NULL"})
        assert body["rows"] == [[18]]
        status, body = await api(served, "POST", "/v1/sql", {"query": "SELECT count(*) FROM calls"})
        assert body["rows"] == [[19]]  # the 18 episodes' calls and the late one
    finally:
        served.stop()


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs: the store's disk, to fill."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


async def test_a_full_disk_keeps_inference_serving_and_corrupts_nothing(fake_upstream_process, small_disk, tmp_path):
    served = ServeProcess(small_disk, fake_upstream_process.url, log_dir=tmp_path, serve_without_store="true",
                          batch_linger_ms=20)
    await served.ready()
    try:
        client = openai.AsyncOpenAI(base_url=f"{served.url}/agents/a/v1", api_key="x", max_retries=0)
        first = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        episode = first.headers["X-Flywheel-Episode"]
        assert (await api(served, "POST", f"/v1/episodes/{episode}/feedback", {"reward": 1}))[0] == 200
        free = os.statvfs(small_disk)
        filler = small_disk / "filler"
        filler.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 256 * 1024))  # leave 256 KB
        big = [{"role": "user", "content": "x" * 100_000}]
        for _ in range(40):  # records of 100 KB each until the disk refuses them
            reply = await client.chat.completions.create(model="m", messages=big)
            assert reply.choices[0].message.content  # inference goes on meanwhile
            status, ready = await api(served, "GET", "/readyz")
            if ready["degraded"]:
                break
        # still ready (it serves), degraded: the store cannot write
        assert status == 200 and ready["degraded"] == ["store"] and "No space left" in ready["checks"]["store"]["detail"]
        status, refused = await api(served, "POST", f"/v1/episodes/{episode}/feedback", {"reward": 0})
        assert status == 503 and refused["error"]["code"] == "store_unavailable"
        filler.unlink()  # room again: writes resume by themselves
        async def writable() -> bool:
            return (await api(served, "GET", "/readyz"))[1]["degraded"] == []

        await eventually(writable, 15, "store writable again", 0.1)
        assert (await api(served, "POST", f"/v1/episodes/{episode}/feedback", {"reward": 0.5}))[0] == 200
    finally:
        assert served.stop() == 0
    from tests.conftest import read_db

    rows = read_db(served.db, "SELECT count(*) AS calls FROM calls")  # opens cleanly: nothing corrupt
    assert rows[0]["calls"] >= 1
    assert [r["reward"] for r in read_db(served.db, "SELECT reward FROM feedback ORDER BY created_at")] == [1.0, 0.5]
