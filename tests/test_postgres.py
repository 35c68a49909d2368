"""The store on PostgreSQL: the spec in its dialect, the same behaviour as DuckDB's store, and
what several proxies on one database need (seqs, idempotency, claims, locks, the registry's
change marker, a read-only SQL route). One throwaway server for the module, a fresh database
per test (tests/postgres_server.py)."""

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from flywheel.store import UnsupportedStore, open_store
from flywheel.store.db import Store
from flywheel.store.pg_sandbox import fetcher
from flywheel.store.postgres import READER_ROLE, PostgresStore
from flywheel.store.records import (AdapterRow, AuditEntry, CallRecord, EpisodeClose, EpisodeOpen, EpisodesPushed,
                                    Erase, Erased, Feedback, InfraError, StripContent)
from flywheel.store.sandbox import QueryError, ReadOnlyViolation, collect
from flywheel.store.schema import POSTGRES, SCHEMA_VERSION, TABLES
from tests import postgres_server as server

postgres_server, postgres_url = server.postgres_server, server.postgres_url  # the fixtures

pytestmark = pytest.mark.postgres

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def call(call_id: str, episode_id: str, **changes) -> CallRecord:
    """A realistic call: token ids and logprobs, sampling values."""
    record = CallRecord(call_id=call_id, episode_id=episode_id, agent="solver", created_at=NOW, endpoint="chat.completions",
                        stream=False, model="m", adapter="solver-v1", request='{"messages": [{"role": "user", "content": "q"}]}',
                        response='{"choices": [{"text": "a"}]}', prompt_token_ids=list(range(20)),
                        completion_token_ids=[7, 8, 9], completion_logprobs=[-0.5, -0.25, -1.0], finish_reason="stop",
                        prompt_tokens=20, completion_tokens=3, latency_ms=12.5, ttft_ms=None, status=200, error=None)
    return dataclasses.replace(record, **changes)


@pytest.fixture
def store(postgres_url):
    opened = PostgresStore(postgres_url)
    yield opened
    opened.close()


def admin(server, url: str) -> psycopg.Connection:
    return psycopg.connect(server.admin_url(url), autocommit=True)


def rows(store, sql: str) -> list[list]:
    return store.query(sql, 100_000, 30)["rows"]


# ---- the spec --------------------------------------------------------------------------


def test_created_database_matches_the_spec_exactly(store, postgres_server, postgres_url):
    with admin(postgres_server, postgres_url) as con:
        for table in TABLES:
            found = con.execute(
                "SELECT column_name, CASE data_type WHEN 'ARRAY' THEN udt_name::regtype::text ELSE data_type END "
                "FROM information_schema.columns WHERE table_name = %s AND table_schema = 'public' "
                "ORDER BY ordinal_position", [table.name]).fetchall()
            assert found == [(c.name, POSTGRES.types[c.sql_type]) for c in table.columns]
            indexes = set(con.execute(
                "SELECT c.relname, i.indisunique, i.indpred IS NOT NULL FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid "
                "WHERE t.relname = %s AND NOT i.indisprimary", [table.name]).fetchall())
            assert indexes == {(i.name(table.name), i.unique, bool(i.where)) for i in table.indexes}
        assert con.execute("SELECT value FROM flywheel_meta WHERE key='schema_version'").fetchone()[0] == \
            str(SCHEMA_VERSION)


def test_an_older_database_is_upgraded_in_place_and_keeps_its_rows(postgres_server, postgres_url):
    PostgresStore(postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as con:  # as schema 6 had it: no change marker
        con.execute("ALTER TABLE adapters DROP COLUMN updated_at")
        con.execute("INSERT INTO adapters (served_name, agent, version, path, created_at, status, decided_at) "
                    "VALUES ('a-v1', 'a', 1, '/p', now() - interval '1 day', 'active', now() - interval '1 hour')")
        con.execute("UPDATE flywheel_meta SET value = '6'")
    store = PostgresStore(postgres_url)
    [row] = store.adapter_rows()
    assert row.served_name == "a-v1" and store.adapters_changed_at() == row.decided_at  # backfilled
    store.close()


def test_a_newer_database_is_refused(postgres_url):
    PostgresStore(postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as con:
        con.execute("UPDATE flywheel_meta SET value = %s", [str(SCHEMA_VERSION + 1)])
    with pytest.raises(RuntimeError, match="newer"):
        PostgresStore(postgres_url)


def test_open_store_picks_the_database_by_what_db_names(postgres_url, tmp_path):
    duck = open_store(str(tmp_path / "f.duckdb"))
    pg = open_store(postgres_url)
    assert isinstance(duck, Store) and isinstance(pg, PostgresStore) and pg.shared and not duck.shared
    duck.close()
    pg.close()
    with pytest.raises(UnsupportedStore, match="mysql://"):
        open_store("mysql://u@h/db")


# ---- the same answers as DuckDB ------------------------------------------------------


def _scenario() -> list:
    """Episodes of every kind the reads tell apart: rewarded, graded, shadowed, eval, infra-failed, open."""
    later = NOW + timedelta(seconds=1)
    return [
        EpisodeOpen("ep-a", NOW, task_id="t1", agent="solver", metadata='{"user": "u1"}'),
        call("a0", "ep-a"), call("a1", "ep-a", adapter="solver-v1"),
        call("a0-s", "ep-a", shadow_of="a0", seq=0, completion_logprobs=[-2.0]),
        Feedback("fa", "ep-a", 1.0, NOW, dims='{"correct": 1}', source="user", idempotency_key="k1"),
        Feedback("fa-call", "ep-a", 0.5, later, call_id="a0", source="grader", grader_version="g1"),
        EpisodeClose("ep-a", NOW),
        EpisodeOpen("ep-eval", NOW, metadata='{"eval": true}'), call("e0", "ep-eval", adapter="solver-v2", created_at=later),
        Feedback("fe", "ep-eval", 0.0, NOW), EpisodeClose("ep-eval", NOW),
        call("i0", "ep-infra", task_id="t2", status=502, error="bad gateway"), Feedback("fi", "ep-infra", 1.0, NOW),
        EpisodeClose("ep-infra", NOW),
        call("o0", "ep-open"), call("o1", "ep-open", task_id="late-task"), InfraError("ep-none", "tool down"),
        AdapterRow("solver-v1", "solver", 1, "/a/1", "m", NOW, "active", live_at=NOW, comparison='{"look": 1}'),
    ]


def _normal(value):
    """Values as both stores give them, compared: JSON text by meaning, times as instants, without
    the claim columns (only PostgresStore claims)."""
    import json

    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items() if not k.startswith("push_claimed")}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, str) and value[:1] in "{[":
        return json.loads(value)
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc)
    return value


def test_reads_answer_as_duckdbs_do(store, tmp_path):
    duck = Store(str(tmp_path / "f.duckdb"))
    for each in (duck, store):
        assert [type(r).__name__ for r in each.apply(_scenario())].count("UnknownEpisode") == 1
    for read in (lambda s: s.episodes_to_push(10, 0),
                 lambda s: s.episodes_to_push(10, 0, await_grade=("grader", "g1", True)),
                 lambda s: s.episodes_to_grade("grader", "g2", False, 0, None, None, 10),
                 lambda s: s.episodes_to_grade("grader", "g1", True, 0, NOW - timedelta(days=1), None, 10),
                 lambda s: s.episodes_with_calls(["ep-open", "ep-a", "nope"], "grader"),
                 lambda s: s.shadow_origin("a0"), lambda s: s.shadow_origin("a0-s"),
                 lambda s: s.version_rewards("solver", NOW - timedelta(days=1)),
                 lambda s: s.adapter_rows(), lambda s: s.episode("ep-a"),
                 lambda s: s.query("SELECT episode_id, task_id, status, reward, infra_error IS NOT NULL AS infra "
                                   "FROM episodes ORDER BY episode_id", 100, 10)):
        assert _normal(read(store)) == _normal(read(duck))
    duck.close()


def test_data_governance_writes_and_reads_do_as_duckdbs_do(store, tmp_path):
    """Erasure, content retention, the audit log and untrainable calls, on both stores."""
    duck = Store(str(tmp_path / "f.duckdb"))
    audit = AuditEntry(NOW, "0123abcd4567", "erase", "ep-a", detail='{"metadata": {"user": "u1"}}')
    for each in (duck, store):
        each.apply(_scenario() + [call("p0", "ep-private", train=False), Feedback("fp", "ep-private", 1.0, NOW),
                                  EpisodeOpen("judge-1", NOW, agent="flywheel-judge",
                                              metadata='{"flywheel": "judge", "judged": ["ep-a", "ep-x"]}'),
                                  call("j0", "judge-1")])
    for read in (lambda s: s.episodes_with_metadata({"user": "u1"}),
                 lambda s: s.expired_episodes(NOW + timedelta(days=1), 2),
                 lambda s: s.episodes_with_old_content(NOW + timedelta(seconds=0.5), 10),
                 lambda s: [e["episode_id"] for e in s.episodes_to_push(10, 0)]):
        assert read(store) == read(duck)
    assert "ep-private" not in [e["episode_id"] for e in store.episodes_to_push(10, 0)]
    for each in (duck, store):
        assert each.apply([Erase(("ep-a",), audit), StripContent(("ep-eval",), NOW + timedelta(days=1), audit)]) == [
            Erased(episodes=1, calls=4, feedback=2, passthrough=0, judge_episodes=1), 1]
    for sql in ("SELECT episode_id, stored, request IS NULL AS gone FROM calls ORDER BY call_id",
                "SELECT episode_id, train FROM episodes ORDER BY episode_id",
                "SELECT key_id, action, target, row_count FROM audit_log ORDER BY row_count"):
        assert rows(store, sql) == rows(duck, sql)
    assert rows(store, "SELECT row_count FROM audit_log ORDER BY row_count") == [[1], [8]]
    duck.close()


def test_a_batch_retried_after_its_commit_lands_once(store):
    """The commit went through but its acknowledgement was lost: the writer sends the batch again."""
    batch = [call("c0", "ep"), call("c1", "ep"), Feedback("f", "ep", 1.0, NOW),
             Feedback("f-keyed", "ep", 0.5, NOW, idempotency_key="k"),
             AdapterRow("solver-v1", "solver", 1, "/a", None, NOW, "active")]
    first, again = store.apply(batch), store.apply(batch)
    assert not first[2].duplicate and again[2].duplicate and again[3].feedback_id == "f-keyed"
    assert rows(store, "SELECT call_id, seq FROM calls ORDER BY seq") == [["c0", 0], ["c1", 1]]
    assert rows(store, "SELECT count(*) FROM feedback") == [[2]]


# ---- several proxies on one database ---------------------------------------------------


def test_two_proxies_appending_to_the_same_episodes_never_share_a_seq(postgres_url):
    stores = [PostgresStore(postgres_url) for _ in range(2)]
    episodes = [f"ep-{i}" for i in range(4)]

    def write(which: int) -> None:
        for batch in range(15):  # each batch touches every episode, in an order of its own
            order = episodes if (batch + which) % 2 else episodes[::-1]
            ops = [call(f"p{which}-b{batch}-{e}-{k}", e) for e in order for k in range(2)]
            ops.insert(3, Feedback(f"f{which}-{batch}", order[0], 1.0, NOW))
            assert all(r is None or not isinstance(r, Exception) for r in stores[which].apply(ops))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(write, range(2)))
    for episode in episodes:
        seqs = [r[0] for r in rows(stores[0], f"SELECT seq FROM calls WHERE episode_id = '{episode}' ORDER BY seq")]
        assert seqs == list(range(60))
    for s in stores:
        s.close()


def test_the_same_feedback_through_either_proxy_is_applied_once(postgres_url):
    stores = [PostgresStore(postgres_url) for _ in range(2)]
    stores[0].apply([EpisodeOpen("ep", NOW)])
    start = threading.Barrier(2)

    def post(which: int):
        start.wait()
        return stores[which].apply([Feedback(f"f-{which}", "ep", float(which), NOW, idempotency_key="once")])[0]

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(post, range(2)))
    assert sorted(r.duplicate for r in results) == [False, True]
    assert results[0].feedback_id == results[1].feedback_id
    assert rows(stores[1], "SELECT count(*) FROM feedback") == [[1]]
    for s in stores:
        s.close()


def _rewarded(store, count: int) -> None:
    ops = []
    for i in range(count):
        ops += [call(f"c{i}", f"ep-{i:03}"), Feedback(f"f{i}", f"ep-{i:03}", 1.0, NOW), EpisodeClose(f"ep-{i:03}", NOW)]
    store.apply(ops)


def test_concurrent_pushes_from_two_proxies_get_disjoint_episodes(postgres_url):
    stores = [PostgresStore(postgres_url) for _ in range(2)]
    _rewarded(stores[0], 40)
    start = threading.Barrier(2)

    def claim(which: int) -> list[str]:
        start.wait()
        return [e["episode_id"] for e in stores[which].episodes_to_push(25, 0)]

    with ThreadPoolExecutor(2) as pool:
        mine, theirs = pool.map(claim, range(2))
    assert not set(mine) & set(theirs) and len(set(mine) | set(theirs)) == 40
    assert all(len(e["calls"]) == 1 for e in stores[0].episodes_to_push(25, 0))  # its own claims come back
    assert [e["episode_id"] for e in stores[0].episodes_to_push(25, 0)] == sorted(mine)
    stores[0].apply([EpisodesPushed(tuple(mine), NOW)])
    assert stores[0].episodes_to_push(25, 0) == []
    for s in stores:
        s.close()


def test_a_lapsed_claim_is_taken_over_and_a_closed_store_hands_its_claims_back(postgres_url):
    dying, other = PostgresStore(postgres_url, claim_lease_s=0.3), PostgresStore(postgres_url)
    _rewarded(dying, 3)
    assert len(dying.episodes_to_push(10, 0)) == 3 and other.episodes_to_push(10, 0) == []
    time.sleep(0.4)  # the first proxy died holding them: once the lease lapses they are another's
    assert len(other.episodes_to_push(10, 0)) == 3 and dying.episodes_to_push(10, 0) == []
    other.close()
    assert len(dying.episodes_to_push(10, 0)) == 3  # closing handed them back at once
    dying.close()


def test_try_lock_is_held_by_one_store_until_it_closes(postgres_url):
    first, second = PostgresStore(postgres_url), PostgresStore(postgres_url)
    assert first.try_lock("restore") and first.try_lock("restore")
    assert not second.try_lock("restore") and second.try_lock("grade")
    first.close()
    assert second.try_lock("restore")
    second.close()


def test_adapters_changed_at_moves_with_every_registry_write_from_either_proxy(postgres_url):
    first, second = PostgresStore(postgres_url), PostgresStore(postgres_url)
    assert first.adapters_changed_at() is None
    row = AdapterRow("solver-v1", "solver", 1, "/a", None, NOW, "candidate")
    seen = []
    for store, status in ((first, "candidate"), (second, "active"), (first, "retired")):
        store.apply([dataclasses.replace(row, status=status)])
        seen.append(second.adapters_changed_at())
    assert seen == sorted(set(seen)) and len(seen) == 3
    assert [r.status for r in first.adapter_rows()] == ["retired"]
    first.close()
    second.close()


# ---- the SQL route -----------------------------------------------------------------


@pytest.mark.parametrize("query", [
    "INSERT INTO episodes (episode_id) VALUES ('x')",
    "UPDATE episodes SET reward = 1",
    "DELETE FROM calls",
    "DROP TABLE calls",
    "CREATE TABLE t AS SELECT 1",
    "COPY calls TO STDOUT",
    "COPY calls TO '/tmp/leak.csv'",
    "SET ROLE flywheel",
    "RESET ROLE",
    "SET statement_timeout = 0",
    "SELECT set_config('role', 'flywheel', false)",
    'SELECT "set_config"(\'statement_timeout\', \'0\', false)',
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT pg_catalog.pg_ls_dir('.')",
    "SELECT pg_advisory_lock(1)",
    "SELECT * FROM query_to_xml('DELETE FROM calls', true, true, '')",
    "SELECT * INTO stolen FROM calls",
    "SELECT * FROM episodes FOR UPDATE",
    "SELECT * FROM pg_authid",
    "WITH d AS (DELETE FROM episodes RETURNING *) SELECT count(*) FROM d",
    "EXPLAIN ANALYZE UPDATE episodes SET reward = 0",
    "EXPLAIN (ANALYZE, FORMAT JSON) DELETE FROM calls",
    "SELECT 1; DELETE FROM calls",
    "DO $$ BEGIN DELETE FROM calls; END $$",
    "SELEC 1",
])
def test_anything_but_a_read_is_refused(store, query):
    store.apply([call("c", "ep")])
    with pytest.raises((ReadOnlyViolation, QueryError)):
        store.query_json(query, 10, 10_000, 5)
    assert rows(store, "SELECT count(*) FROM calls") == [[1]] and rows(store, "SELECT count(*) FROM episodes") == [[1]]
    assert rows(store, "SELECT current_user") == [[READER_ROLE]]  # nothing outlived the query


def test_the_server_refuses_writes_the_lexical_check_would_miss(store):
    """The READ ONLY transaction and the reader role hold on their own."""
    with store._users.connection() as con:
        for query in ("INSERT INTO episodes (episode_id) VALUES ('x')", "SELECT set_config('role', 'flywheel', true)"):
            with pytest.raises(QueryError):
                collect(fetcher(con, query + ("" if query.startswith("INSERT") else
                                              "; INSERT INTO episodes (episode_id) VALUES ('x')"), 5, READER_ROLE), 1)
    with psycopg.connect(store.url, autocommit=True) as con:
        privileges = con.execute("SELECT has_table_privilege(%s, 'calls', 'INSERT'), "
                                 "has_table_privilege(%s, 'calls', 'SELECT')", [READER_ROLE] * 2).fetchone()
    assert privileges == (False, True)


def test_a_late_cancel_never_reaches_the_next_query(store):
    """The timer's cancel and the server's statement_timeout fire together; the cancel request
    can arrive after the next query began on the same connection, unless that one is dropped."""
    for _ in range(30):
        with pytest.raises(QueryError, match="time limit"):
            store.query("SELECT pg_sleep(1)", 1, 0.02)
        assert store.query("SELECT 1 AS one FROM pg_sleep(0.05)", 1, 5)["rows"] == [[1]]


def test_replies_are_limited_in_time_rows_and_bytes(store):
    started = time.monotonic()
    with pytest.raises(QueryError, match="time limit"):
        store.query("SELECT count(*) FROM generate_series(1, 10000000000)", 10, 0.3)
    with pytest.raises(QueryError, match="time limit"):  # the whole fetch, not each chunk of it
        store.query("SELECT pg_sleep(0.01) FROM generate_series(1, 1000)", 100_000, 0.3)
    assert time.monotonic() - started < 5
    out = store.query("SELECT i FROM generate_series(1, 50) i", 7, 5)
    assert len(out["rows"]) == 7 and out["truncated"] is True and out["types"] == ["INTEGER"]
    import orjson

    body = orjson.loads(store.query_json("SELECT repeat('x', 1000) AS s FROM generate_series(1, 100)", 1000, 10_000, 5))
    assert body["truncated"] is True and 5 <= len(body["rows"]) < 10
    body = orjson.loads(store.query_json("SELECT 5 % 2 AS odd, '{\"a\": [1]}'::jsonb AS j", 10, 10_000, 5))
    assert body["rows"] == [[1, {"a": [1]}]] and body["types"] == ["INTEGER", "JSON"]
