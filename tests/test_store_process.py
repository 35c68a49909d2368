"""The store in a child process of its own (store/process.py): what crosses the boundary, calls at
once, a child killed mid-write, a parent killed, errors at open, and the proxy's default."""

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pytest

from flywheel.proxy.config import ProxyConfig
from flywheel.settings import load_config
from flywheel.store import StoreUnreachable, UnsupportedStore
from flywheel.store.db import Store
from flywheel.store.process import StoreProcess
from flywheel.store.records import CallRecord, EpisodeOpen, Feedback, StoreUnavailable, UnknownEpisode
from flywheel.store.sandbox import QueryError, ReadOnlyViolation
from flywheel.store.writer import BatchWriter
from tests.conftest import eventually, free_port, read_db
from tests.test_feedback import api

NOW = datetime.now(timezone.utc)
SLOW_QUERY = "SELECT count(*) FROM range(500000000) t(i) WHERE hash(i) % 7 = 0"  # ~2 s on 2 cores


@pytest.fixture
def store(db_path):
    process = StoreProcess(db_path)
    yield process
    process.close()


def _call(call_id: str, episode_id: str) -> CallRecord:
    return CallRecord(call_id=call_id, episode_id=episode_id, agent="a", created_at=NOW, endpoint="chat",
                      stream=False, model="m", adapter=None, request="{}", response="{}",
                      prompt_token_ids=list(range(300)), completion_token_ids=list(range(300)),
                      completion_logprobs=[-0.5] * 300, finish_reason="stop", prompt_tokens=300,
                      completion_tokens=300, latency_ms=1.0, ttft_ms=None, status=200, error=None)


def _rows(store: StoreProcess, sql: str) -> list[list]:
    return store.query(sql, 100_000, 30)["rows"]


def _gone(pid: int) -> bool:
    """Every thread of the process exited (a zombie nobody reaped counts: it holds no file)."""
    states = []
    for task in Path(f"/proc/{pid}/task").glob("*") if Path(f"/proc/{pid}").exists() else ():
        try:
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        except FileNotFoundError:  # that thread just went
            pass
    return all(state == "Z" for state in states)


def test_ops_applied_in_the_child_are_read_there_and_in_the_file_after_close(db_path):
    store = StoreProcess(db_path)
    pid = store.pid
    try:
        assert pid != os.getpid() and not store.shared
        assert store.apply([EpisodeOpen("ep", NOW), _call("c1", "ep")]) == [None, None]
        [result] = store.apply([Feedback("fb", "ep", 1.0, NOW)])
        assert (result.feedback_id, result.duplicate, result.episode_reward) == ("fb", False, 1.0)
        assert _rows(store, "SELECT episode_id, reward FROM episodes") == [["ep", 1.0]]
    finally:
        store.close()
    assert _gone(pid)
    assert read_db(db_path, "SELECT call_id, seq, array_length(prompt_token_ids) AS n FROM calls") == [
        {"call_id": "c1", "seq": 0, "n": 300}]


def test_the_stores_exceptions_cross_with_their_type_and_attributes(store):
    with pytest.raises(QueryError, match="syntax error"):
        store.query("SELEC 1", 10, 10)
    with pytest.raises(ReadOnlyViolation, match="read-only"):
        store.query_json("DELETE FROM calls", 10, 1000, 10)
    with pytest.raises(UnknownEpisode, match="nope"):
        store.episode("nope")
    [missing] = store.apply([Feedback("fb", "nope", 1.0, NOW)])  # a per-op error is a result, not raised
    assert isinstance(missing, UnknownEpisode)
    assert store.query("SELECT 1 AS one", 10, 10)["rows"] == [[1]]  # the connections are fine after all that


def test_a_slow_query_does_not_hold_up_a_write(store):
    ran: dict[str, float] = {}

    def slow_query():
        ran["started"] = time.monotonic()
        store.query_json(SLOW_QUERY, 10, 1000, 30)
        ran["ended"] = time.monotonic()

    querying = threading.Thread(target=slow_query)
    querying.start()
    time.sleep(0.3)  # the query is under way
    started = time.monotonic()
    store.apply([EpisodeOpen("ep", NOW)])
    applied = time.monotonic()
    querying.join(60)
    assert ran["ended"] > applied, "the query ended before the write: it proves nothing"
    assert applied - started < 1.0, f"the write took {applied - started:.2f} s beside a query of " \
                                    f"{ran['ended'] - ran['started']:.2f} s"


def test_a_batch_whose_reply_was_lost_lands_once_when_applied_again(store):
    ops = [EpisodeOpen("ep", NOW), _call("c1", "ep"), _call("c2", "ep"), Feedback("fb", "ep", 1.0, NOW)]
    store.apply(ops)
    store._reply_lost = True  # as when the child was killed between its commit and its reply
    again = store.apply(ops + [_call("c3", "ep")])
    assert again[:3] == [None, None, None] and again[3].duplicate and again[4] is None
    assert _rows(store, "SELECT call_id, seq FROM calls ORDER BY seq") == [["c1", 0], ["c2", 1], ["c3", 2]]
    assert _rows(store, "SELECT count(*) FROM feedback") == [[1]]


async def test_a_child_killed_mid_write_is_replaced_and_every_accepted_op_lands_once(db_path):
    store = StoreProcess(db_path)
    writer = BatchWriter(store, linger_s=0.005)
    writer.start()
    accepted: list[str] = []

    async def write(first: int, count: int) -> None:
        async def one(n: int) -> None:
            await writer.put(_call(f"call-{n}", f"ep-{n}"))
            await writer.submit(EpisodeOpen(f"ep-{n}", NOW))  # acknowledged: committed, with its call
            accepted.append(f"ep-{n}")

        await asyncio.gather(*(one(n) for n in range(first, first + count)))

    failures: list[str] = []

    async def watch() -> None:
        while True:
            if writer.failing is not None:
                failures.append(writer.failing)
            await asyncio.sleep(0.01)

    watching = asyncio.create_task(watch())
    try:
        await write(0, 50)
        killed = store.pid
        during = asyncio.create_task(write(50, 200))
        await asyncio.sleep(0.05)  # batches in flight
        os.kill(killed, signal.SIGKILL)
        await asyncio.wait_for(during, 60)
        await asyncio.wait_for(write(250, 50), 30)
        await eventually(lambda: writer.failing is None, 30, "the writer writing again")
        assert failures and "store process stopped" in failures[0] and store.pid not in (None, killed)
        assert _rows(store, "SELECT count(*), count(DISTINCT call_id) FROM calls") == [[300, 300]]
    finally:
        watching.cancel()
        await writer.close()
    stored = read_db(db_path, "SELECT episode_id FROM episodes")
    assert sorted(r["episode_id"] for r in stored) == sorted(accepted) and len(accepted) == 300


def test_a_killed_parent_takes_its_store_process_along_and_frees_the_file(db_path, tmp_path):
    pid_file = tmp_path / "child.pid"
    script = ("import sys, time\nfrom flywheel.store.process import StoreProcess\n"
              f"store = StoreProcess({db_path!r})\nopen({str(pid_file)!r}, 'w').write(str(store.pid))\ntime.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script])
    child = None
    try:
        for _ in range(300):
            if pid_file.exists() and pid_file.read_text():
                child = int(pid_file.read_text())
                break
            assert parent.poll() is None, "the parent exited before its store was open"
            time.sleep(0.1)
        assert child is not None, "no store process within 30 s"
        parent.kill()
        parent.wait(10)
        for _ in range(100):
            if _gone(child):
                break
            time.sleep(0.05)
        assert _gone(child), "the store process outlived its parent by 5 s"
        Store(db_path).close()  # the file's lock went with it
    finally:
        parent.kill()
        parent.wait(10)
        if child is not None and not _gone(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("db, error", [
    ("mysql://db.example/flywheel", UnsupportedStore),
    (f"postgresql://flywheel:secret@127.0.0.1:{free_port()}/flywheel", StoreUnreachable),
])
def test_an_error_opening_the_store_is_raised_at_start_as_itself_and_leaves_no_process(db, error):
    before = {p.pid for p in multiprocessing.active_children()}
    started = time.monotonic()
    with pytest.raises(error):
        StoreProcess(db)
    assert time.monotonic() - started < 20
    assert {p.pid for p in multiprocessing.active_children()} <= before


def test_a_file_another_process_holds_is_refused_at_start(db_path):
    holder = duckdb.connect(db_path)
    try:
        with pytest.raises(duckdb.IOException, match="lock"):
            StoreProcess(db_path)
    finally:
        holder.close()


def test_the_child_caps_its_own_address_space(db_path):
    store = StoreProcess(db_path, memory_headroom_mb=1024)
    try:
        limits = Path(f"/proc/{store.pid}/limits").read_text()
    finally:
        store.close()
    [soft] = [line.split()[3] for line in limits.splitlines() if line.startswith("Max address space")]
    assert soft != "unlimited" and int(soft) > 1024 << 20


async def test_the_proxy_runs_its_store_in_a_child_by_default(proxy):
    store = proxy.state.writer.store
    assert isinstance(store, StoreProcess) and store.pid != os.getpid()
    status, created = await api(proxy, "POST", "/v1/episodes", {"agent": "a"})
    assert status == 201
    assert await proxy.rows("SELECT episode_id FROM episodes") == [{"episode_id": created["episode_id"]}]


async def test_store_process_false_keeps_the_store_in_the_serving_process(start_proxy, monkeypatch):
    assert (await start_proxy(store_process=False)).state.writer.store.__class__ is Store
    monkeypatch.setenv("FLYWHEEL_PROXY_STORE_PROCESS", "false")
    assert load_config(ProxyConfig, "proxy", None, {}).store_process is False


def test_a_closed_store_process_refuses_calls(db_path):
    store = StoreProcess(db_path)
    store.close()
    store.close()  # twice is fine
    with pytest.raises(StoreUnavailable, match="closed"):
        store.adapter_rows()
