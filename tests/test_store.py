"""The store: one schema spec, in-place upgrade, batching, back-pressure, shutdown flush."""

import asyncio
import dataclasses
import time

import duckdb
import openai
import pytest

from flywheel.store import open_store
from flywheel.store import db as store_db
from flywheel.store.base import StoreBase
from flywheel.store.db import Store
from flywheel.store.records import CallRecord, StoreUnavailable
from flywheel.store.schema import CALLS, SCHEMA_VERSION, TABLES
from tests.conftest import read_db
from tests import postgres_server as server
from tests.test_feedback import api

# the fixtures: a store of each kind (`any_store`), on a throwaway PostgreSQL server
postgres_server, postgres_url, any_store = server.postgres_server, server.postgres_url, server.store_db


def test_created_database_matches_the_spec_exactly(db_path):
    Store(db_path).close()
    con = duckdb.connect(db_path, read_only=True)
    for table in TABLES:
        found = con.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
            "ORDER BY ordinal_position", [table.name]).fetchall()
        assert found == [(c.name, c.sql_type.replace("TIMESTAMPTZ", "TIMESTAMP WITH TIME ZONE")) for c in table.columns]
    assert con.execute("SELECT value FROM flywheel_meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)


def test_call_record_fields_match_the_calls_table():
    record_fields = {f.name for f in dataclasses.fields(CallRecord)}
    assert record_fields - {"task_id", "train"} == set(CALLS.column_names)  # those two go to the episode row


def test_older_file_is_upgraded_in_place_and_keeps_its_rows(db_path):
    con = duckdb.connect(db_path)
    con.execute("CREATE TABLE episodes (episode_id VARCHAR PRIMARY KEY, task_id VARCHAR)")
    con.execute("INSERT INTO episodes VALUES ('old-ep', 'old-task')")
    con.close()
    Store(db_path).close()
    [row] = read_db(db_path, "SELECT episode_id, task_id, status, reward FROM episodes")
    assert row == {"episode_id": "old-ep", "task_id": "old-task", "status": None, "reward": None}
    assert read_db(db_path, "SELECT count(*) AS n FROM calls") == [{"n": 0}]


def test_calls_recorded_before_the_sampling_columns_get_them_from_their_requests(db_path):
    """A version-1 store: temperature and n lived only in the request JSON (a bad value there
    made the feed raise); the upgrade fills the new columns, TRY_CAST turning junk into the neutral value."""
    con = duckdb.connect(db_path)
    con.execute("CREATE TABLE calls (call_id VARCHAR, request JSON)")
    con.execute("""INSERT INTO calls VALUES ('c1', '{"temperature": 0.5, "n": 2}'), ('c2', '{"temperature": "hot"}'),
                   ('c3', '{}')""")
    con.close()
    Store(db_path).close()
    rows = read_db(db_path, "SELECT call_id, temperature, top_p, choices FROM calls ORDER BY call_id")
    assert [(r["temperature"], r["top_p"], r["choices"]) for r in rows] == [(0.5, 1.0, 2), (1.0, 1.0, 1),
                                                                          (1.0, 1.0, 1)]


def test_a_newer_file_is_refused(db_path):
    Store(db_path).close()
    con = duckdb.connect(db_path)
    con.execute("UPDATE flywheel_meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    con.close()
    with pytest.raises(RuntimeError, match="newer"):
        Store(db_path)


def _slow_apply(monkeypatch, seconds: float):
    original = store_db.Store.apply
    sizes: list[int] = []

    def apply(self, ops):
        time.sleep(seconds)  # runs on the writer thread, like a slow disk
        sizes.append(len(ops))
        return original(self, ops)

    monkeypatch.setattr(store_db.Store, "apply", apply)
    return sizes


async def test_full_queue_applies_back_pressure_and_drops_nothing(start_proxy, monkeypatch):
    batch_sizes = _slow_apply(monkeypatch, 0.05)
    proxy = await start_proxy(queue_max_bytes=6000, batch_max=4, store_process=False)
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/a/v1", api_key="x", max_retries=0)
    highest = highest_bytes = 0

    async def watch():
        nonlocal highest, highest_bytes
        while True:
            highest = max(highest, proxy.state.writer.pending)
            highest_bytes = max(highest_bytes, proxy.state.writer.queued_bytes)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
                           for _ in range(40)))
    watcher.cancel()
    assert highest >= 3 and 5000 < highest_bytes <= 6000  # the queue filled up and never went past its bound
    rows = await proxy.rows("SELECT count(*) AS n, count(DISTINCT call_id) AS ids FROM calls")
    assert rows == [{"n": 40, "ids": 40}]
    assert max(batch_sizes) > 1  # records were written in batches


async def test_shutdown_writes_everything_queued(start_proxy, db_path, monkeypatch):
    _slow_apply(monkeypatch, 0.05)
    proxy = await start_proxy(batch_max=2, store_process=False)
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/a/v1", api_key="x", max_retries=0)
    await asyncio.gather(*(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
                           for _ in range(20)))
    assert proxy.state.writer.pending > 0  # still queued when we stop
    await proxy.stop()
    assert read_db(db_path, "SELECT count(*) AS n FROM calls") == [{"n": 20}]


def _call(episode_id: str) -> CallRecord:
    from datetime import datetime, timezone

    return CallRecord(call_id=f"call-{episode_id}", episode_id=episode_id, agent="a", created_at=datetime.now(timezone.utc),
                      endpoint="chat.completions", stream=False, model="m", adapter=None, request="{}", response=None,
                      prompt_token_ids=[1], completion_token_ids=[2], completion_logprobs=[-0.5], finish_reason="stop",
                      prompt_tokens=1, completion_tokens=1, latency_ms=1.0, ttft_ms=None, status=200, error=None)


def _episode_ids(store) -> list[str]:
    return [row[0] for row in store.query("SELECT episode_id FROM episodes ORDER BY episode_id", 100, 10)["rows"]]


def test_one_bad_record_does_not_take_its_batch_down(any_store):
    from datetime import datetime, timezone

    from flywheel.store.records import EpisodeOpen

    store = open_store(any_store)
    now = datetime.now(timezone.utc)
    good = EpisodeOpen("ep-good", now)
    bad = EpisodeOpen("ep-bad", now, metadata="{not json")
    results = store.apply([good, bad])
    assert results[0] is None and isinstance(results[1], Exception) and not isinstance(results[1], StoreUnavailable)
    # a value the bulk insert cannot hold (Arrow, binary COPY) fails before the database sees it:
    # the batch is split all the same
    call = dataclasses.replace(_call("ep-good"), choices=2**40)
    results = store.apply([EpisodeOpen("ep-also-good", now), call])
    assert results[0] is None and isinstance(results[1], Exception)
    assert _episode_ids(store) == ["ep-also-good", "ep-good"]
    store.close()


async def test_a_restarted_proxy_continues_an_episode_and_a_late_task_is_kept(start_proxy):
    for round_ in range(2):
        proxy = await start_proxy()
        headers = {"X-Flywheel-Task": "late-task"} if round_ else {}
        client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/a/episodes/ep-long/v1", api_key="x",
                                    default_headers=headers)
        for _ in range(3):
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        await proxy.stop()
    proxy = await start_proxy()
    rows = await proxy.rows("SELECT seq FROM calls ORDER BY created_at")
    assert [r["seq"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert await proxy.rows("SELECT task_id FROM episodes") == [{"task_id": "late-task"}]


def _failing_apply(monkeypatch, failures: int):
    """The store refuses the next `failures` batches as a full disk would, then writes again."""
    original = store_db.Store.apply
    left = [failures]

    def apply(self, ops):
        if left[0]:
            left[0] -= 1
            raise StoreUnavailable("IOException: No space left on device (test)")
        return original(self, ops)

    monkeypatch.setattr(store_db.Store, "apply", apply)


async def test_a_store_that_cannot_write_keeps_every_record_and_retries(start_proxy, monkeypatch):
    _failing_apply(monkeypatch, 4)
    proxy = await start_proxy(batch_linger_ms=5, store_process=False)
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/a/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "x"}])
    await asyncio.sleep(0.1)
    assert "No space left" in proxy.state.writer.failing
    episode = raw.headers["X-Flywheel-Episode"]
    status, refused = await api(proxy, "POST", f"/v1/episodes/{episode}/feedback", {"reward": 1})
    assert status == 503 and refused["error"]["code"] == "store_unavailable"  # not accepted: the client retries
    for _ in range(100):
        if proxy.state.writer.failing is None:
            break
        await asyncio.sleep(0.05)
    assert (await api(proxy, "POST", f"/v1/episodes/{episode}/feedback", {"reward": 1}))[0] == 200
    await asyncio.gather(*(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "y"}])
                           for _ in range(5)))
    assert await proxy.rows("SELECT count(*) AS n FROM calls") == [{"n": 6}]
    assert await proxy.rows("SELECT reward FROM feedback") == [{"reward": 1.0}]


async def test_serve_without_store_keeps_inference_up_and_counts_what_it_dropped(start_proxy, monkeypatch):
    _failing_apply(monkeypatch, 10**9)
    proxy = await start_proxy(batch_linger_ms=5, serve_without_store=True, store_process=False)
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/a/v1", api_key="x", max_retries=0)
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "first"}])
    await asyncio.sleep(0.1)
    for _ in range(3):
        reply = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert reply.choices[0].message.content
    assert proxy.state.writer.failing and proxy.state.writer.dropped == 3
    monkeypatch.undo()  # the disk has room again: what was kept is written, nothing else
    await proxy.state.writer.flush()
    assert await proxy.rows("SELECT count(*) AS n FROM calls") == [{"n": 1}]


def _disk_full(store) -> Exception:
    """The error each database raises when its disk is full."""
    if isinstance(store, Store):
        return duckdb.IOException("No space left on device (test)")
    import psycopg

    return psycopg.errors.DiskFull("could not extend file: No space left on device (test)")


def test_a_store_that_fails_part_way_through_a_split_batch_commits_nothing_twice(any_store, monkeypatch):
    from datetime import datetime, timezone

    from flywheel.store.records import EpisodeOpen

    store = open_store(any_store)
    now = datetime.now(timezone.utc)
    original = StoreBase._apply
    calls = []

    def apply(self, ops):  # the batch fails for a bad record; alone, the third op then finds the disk full
        calls.append([op.episode_id for op in ops])
        if len(calls) == 4:
            raise _disk_full(store)
        return original(self, ops)

    monkeypatch.setattr(type(store), "_apply", apply)
    ops = [EpisodeOpen("ep-1", now), EpisodeOpen("ep-bad", now, metadata="{not json"), EpisodeOpen("ep-3", now)]
    with pytest.raises(StoreUnavailable) as unavailable:
        store.apply(ops)
    assert unavailable.value.committed[0] is None and isinstance(unavailable.value.committed[1], Exception)
    assert len(unavailable.value.committed) == 2  # ep-1 committed, ep-bad refused: only ep-3 is retried
    monkeypatch.undo()
    assert store.apply(ops[len(unavailable.value.committed):]) == [None]
    assert _episode_ids(store) == ["ep-1", "ep-3"]
    store.close()


async def test_reads_do_not_wait_out_a_store_that_cannot_write(start_proxy, monkeypatch):
    _failing_apply(monkeypatch, 10**9)
    proxy = await start_proxy(batch_linger_ms=5, store_process=False)
    await openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x").chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}])
    started = time.monotonic()
    status, body = await api(proxy, "POST", "/v1/sql", {"query": "SELECT count(*) FROM calls"})
    assert status == 200 and body["rows"] == [[0]] and time.monotonic() - started < 10
    assert proxy.state.writer.lag_s > 0
    monkeypatch.undo()


def test_a_store_url_is_shown_without_its_password():
    from flywheel.store import shown

    assert shown("postgresql://flywheel:s3cr3t@db:5432/flywheel") == "postgresql://flywheel:***@db:5432/flywheel"
    assert shown("postgresql://db/flywheel") == "postgresql://db/flywheel" and shown("a/b.duckdb") == "a/b.duckdb"


def test_a_postgres_store_out_of_reach_is_a_clear_error_without_the_password(capsys):
    from flywheel.commands import main
    from tests.conftest import free_port

    url = f"postgresql://flywheel:s3cr3t@127.0.0.1:{free_port()}/flywheel"
    assert main(["sql", "SELECT 1", "--db", url]) == 2
    err = capsys.readouterr().err
    assert "cannot open the store postgresql://flywheel:***@127.0.0.1" in err and "s3cr3t" not in err
    assert main(["sql", "SELECT 1", "--db", "mysql://u@h/db"]) == 2
    assert "postgresql:// URL" in capsys.readouterr().err
