"""POST /v1/sql and `flywheel sql`: read-only queries on the live store, everything else refused."""

import asyncio
import json
import subprocess
import sys

import openai
import pytest

from tests.test_feedback import api


async def test_select_returns_columns_types_and_rows(proxy):
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key="x")
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    status, out = await api(proxy, "POST", "/v1/sql", {
        "query": "SELECT agent, completion_token_ids, request, created_at FROM calls"})
    assert status == 200 and out["columns"] == ["agent", "completion_token_ids", "request", "created_at"]
    assert out["types"][:3] == ["VARCHAR", "INTEGER[]", "JSON"] and out["truncated"] is False
    [[agent, ids, request, created_at]] = out["rows"]
    assert agent == "solver" and ids == [1000, 1001, 1002, 1003] and request["model"] == "m"
    assert created_at.startswith("20")


async def test_row_limit_truncates_and_says_so(proxy):
    status, out = await api(proxy, "POST", "/v1/sql", {"query": "SELECT * FROM range(50)", "max_rows": 7})
    assert status == 200 and len(out["rows"]) == 7 and out["truncated"] is True


@pytest.mark.parametrize("query", [
    "INSERT INTO episodes (episode_id) VALUES ('x')",
    "DELETE FROM calls",
    "UPDATE episodes SET reward = 1",
    "DROP TABLE calls",
    "CREATE TABLE t AS SELECT 1",
    "SET threads = 1",
    "PRAGMA threads = 1",
    "ATTACH '/tmp/other.duckdb' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "COPY calls TO '/tmp/leak.csv'",
    "EXPORT DATABASE '/tmp/leak'",
    "CALL pragma_version()",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT 1; DELETE FROM calls",
    "SELEC 1",
])
async def test_anything_but_a_read_is_refused_with_400(proxy, query):
    _, created = await api(proxy, "POST", "/v1/episodes", {})
    status, body = await api(proxy, "POST", "/v1/sql", {"query": query})
    assert status == 400 and body["error"]["code"] in ("read_only", "query_error"), body
    assert len(await proxy.rows("SELECT * FROM episodes")) == 1
    assert (await proxy.rows("SELECT count(*) AS n FROM calls"))[0]["n"] == 0


async def test_missing_query_is_400(proxy):
    status, body = await api(proxy, "POST", "/v1/sql", {"q": "SELECT 1"})
    assert status == 400 and body["error"]["code"] == "invalid_query"


async def test_slow_query_is_interrupted(start_proxy):
    proxy = await start_proxy(sql_timeout_s=0.2)
    status, body = await api(proxy, "POST", "/v1/sql", {"query": "SELECT count(*) FROM range(10000000000) a"})
    assert status == 400 and "time limit" in body["error"]["message"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flywheel", "sql", *args], capture_output=True, text=True,
                          timeout=120)


async def test_cli_through_a_running_proxy_and_on_a_file(start_proxy, db_path):
    proxy = await start_proxy()
    await api(proxy, "POST", "/v1/episodes", {"task": "cli-task"})
    out = await asyncio.to_thread(_cli, "SELECT task_id FROM episodes", "--url", proxy.url, "--format", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [{"task_id": "cli-task"}]
    refused = await asyncio.to_thread(_cli, "DELETE FROM episodes", "--url", proxy.url)
    assert refused.returncode != 0 and "read-only" in refused.stderr
    held = await asyncio.to_thread(_cli, "SELECT 1", "--db", db_path)
    assert held.returncode != 0 and "--url" in held.stderr  # the proxy holds the file
    await proxy.stop()
    table = await asyncio.to_thread(_cli, "SELECT task_id, status FROM episodes", "--db", db_path)
    assert table.returncode == 0 and "cli-task" in table.stdout and "(1 row)" in table.stdout
    csv_out = await asyncio.to_thread(_cli, "SELECT task_id FROM episodes", "--db", db_path, "--format", "csv")
    assert csv_out.stdout.splitlines() == ["task_id", "cli-task"]


async def test_writes_hidden_in_a_select_are_refused_and_never_conflict_with_the_writer(proxy):
    status, created = await api(proxy, "POST", "/v1/episodes", {"agent": "a"})
    episode = created["episode_id"]
    for query, code in (("WITH d AS (DELETE FROM episodes RETURNING *) SELECT count(*) FROM d", "query_error"),
                        ("EXPLAIN ANALYZE UPDATE episodes SET reward = 0", "read_only"),
                        ("SELECT * FROM checkpoint()", "read_only"),
                        ("SELECT * FROM force_checkpoint()", "read_only"),
                        ("SELECT * FROM query('DELETE FROM episodes')", "read_only"),
                        ("EXPLAIN ANALYZE SELECT * FROM checkpoint()", "read_only")):
        feedback = asyncio.create_task(api(proxy, "POST", f"/v1/episodes/{episode}/feedback", {"reward": 1}))
        status, body = await api(proxy, "POST", "/v1/sql", {"query": query})
        assert status == 400 and body["error"]["code"] == code, (query, body)
        assert (await feedback)[0] == 200  # the writer's batch beside it commits
    assert len(await proxy.rows("SELECT * FROM episodes")) == 1
    assert len(await proxy.rows("SELECT * FROM feedback")) == 6
    status, body = await api(proxy, "POST", "/v1/sql", {"query": "EXPLAIN SELECT count(*) FROM episodes"})
    assert status == 200


async def test_replies_are_capped_in_bytes_as_well_as_rows(start_proxy):
    proxy = await start_proxy(sql_max_bytes=10_000)
    status, body = await api(proxy, "POST", "/v1/sql", {"query": "SELECT repeat('x', 1000) AS s FROM range(100)"})
    assert status == 200 and body["truncated"] is True and 5 <= len(body["rows"]) < 10
    status, body = await api(proxy, "POST", "/v1/sql", {"query": "SELECT i FROM range(100) t(i)", "max_rows": 0})
    assert status == 200 and body["rows"] == [] and body["truncated"] is True


async def test_busy_sql_slots_refuse_with_429_and_never_hold_up_the_stores_own_reads(proxy):
    import threading

    writer = proxy.state.writer
    release = threading.Event()
    holders = [asyncio.create_task(writer.user_query(1, release.wait, 10)) for _ in range(2)]  # both slots
    await asyncio.sleep(0.1)
    from flywheel.store.writer import ReadersBusy

    with pytest.raises(ReadersBusy):
        await writer.user_query(0.2, release.wait, 10)
    status, created = await api(proxy, "POST", "/v1/episodes", {"agent": "a"})
    started = asyncio.get_running_loop().time()
    status, _ = await api(proxy, "GET", f"/v1/episodes/{created['episode_id']}")  # the store's own reader threads
    assert status == 200 and asyncio.get_running_loop().time() - started < 1
    release.set()
    await asyncio.gather(*holders)


async def test_a_query_that_builds_huge_values_fails_alone_and_the_proxy_serves_on(serve_process):
    served = await serve_process(memory_headroom_mb=1024, sql_memory_mb=256)
    bomb = "SELECT count(md5(repeat('episode-' || i, 2000000))) FROM range(3000) t(i)"
    status, body = await api(served, "POST", "/v1/sql", {"query": bomb})
    assert status == 400 and "out of memory" in body["error"]["message"]
    client = openai.AsyncOpenAI(base_url=f"{served.url}/agents/a/v1", api_key="x", max_retries=0)
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "still here?"}])
    status, body = await api(served, "POST", "/v1/sql", {"query": "SELECT count(*) FROM calls"})
    assert status == 200 and body["rows"] == [[1]] and served.proc.poll() is None


async def test_values_json_cannot_hold_are_sent_as_text_and_sql_inside_strings_is_refused(proxy):
    status, body = await api(proxy, "POST", "/v1/sql", {"query": "SELECT (1::HUGEINT << 100) AS big, MAP {1: 2} AS m"})
    assert status == 200 and body["rows"] == [[str(1 << 100), {"1": 2}]]
    hidden = "SELECT * FROM json_execute_serialized_sql(json_serialize_sql('SELECT * FROM force_checkpoint()'))"
    status, body = await api(proxy, "POST", "/v1/sql", {"query": hidden})
    assert status == 400 and body["error"]["code"] == "read_only"


async def test_a_query_whose_client_left_keeps_its_slot_until_it_ends(start_proxy):
    import threading

    proxy = await start_proxy(sql_concurrency=1)
    writer = proxy.state.writer
    release = threading.Event()
    waiting = asyncio.create_task(writer.user_query(1, release.wait, 10))
    await asyncio.sleep(0.1)
    waiting.cancel()  # the client gave up; its query still runs on the thread
    await asyncio.sleep(0.05)
    from flywheel.store.writer import ReadersBusy

    with pytest.raises(ReadersBusy):
        await writer.user_query(0.2, release.wait, 10)
    release.set()
    await asyncio.sleep(0.1)
    assert await writer.user_query(1, lambda: 42) == 42
