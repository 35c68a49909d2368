"""Synchronous access to the DuckDB file. Not for the event loop: `store.writer` runs it
on its own threads.

One `Store` owns the file's only read-write connection. Writes happen on one thread
(`apply`), reads on cursors of the same connection (`query`, `episode`), which DuckDB
allows from other threads. External file access is disabled for the whole database,
so no query can read or write files beside the store.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any, Sequence

import duckdb
import orjson
import pyarrow as pa

from flywheel.store.records import (
    AdapterRow,
    ServedReward,
    CallRecord,
    EpisodeClose,
    EpisodeOpen,
    EpisodeQuarantined,
    EpisodesPushed,
    Feedback,
    FeedbackResult,
    GradeFailed,
    InfraError,
    PassthroughRecord,
    StoreOp,
    StoreUnavailable,
    TrainRun,
    UnknownCall,
    UnknownEpisode,
)
from flywheel.store.sandbox import read, read_only_json, read_only_query, read_raw
from flywheel.store.schema import (ADAPTERS, CALLS, EPISODES, IS_EVAL_EPISODE, META, PASSTHROUGH, SCHEMA_VERSION,
                                   TABLES, TRAIN_RUNS, Table)

log = logging.getLogger("flywheel.store")

# A write that failed for want of memory or disk space, not for what it holds.
_RESOURCE_ERRORS = (MemoryError, OSError, duckdb.OutOfMemoryException, duckdb.IOException, pa.ArrowMemoryError)


def _is_resource_error(error: Exception) -> bool:
    text = str(error)
    return "No space left" in text or "Out of Memory" in text or "bad allocation" in text

_CALL_FIELDS = [f.name for f in fields(CallRecord) if f.name in CALLS.column_names]
_EPISODE_CACHE = 100_000  # episodes whose next seq the writer remembers (LRU)


@dataclass
class _EpisodeState:
    next_seq: int
    has_task: bool


@dataclass(frozen=True)
class StoreLimits:
    """DuckDB's caps for the whole database (writer and readers share them); DuckDB spills or
    fails a query past them, but does not count every allocation (see `flywheel.proxy.app`)."""

    memory_mb: int = 2048  # memory_limit
    threads: int = 2  # worker threads per query
    temp_mb: int = 4096  # max_temp_directory_size: what queries may spill to disk


def connect(path: str, read_only: bool = False, limits: StoreLimits = StoreLimits()) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(
        path,
        read_only=read_only,
        config={"enable_external_access": False, "memory_limit": f"{limits.memory_mb}MB",
                "threads": limits.threads, "max_temp_directory_size": f"{limits.temp_mb}MB",
                "lock_configuration": True},
    )


class Store:
    def __init__(self, path: str, read_only: bool = False, limits: StoreLimits = StoreLimits()):
        self.path = path
        self.con = connect(path, read_only=read_only, limits=limits)
        self._episodes: OrderedDict[str, _EpisodeState] = OrderedDict()  # writer thread only
        if not read_only:
            migrate(self.con)

    def close(self) -> None:
        self.con.close()

    # ---- writes (one thread) ------------------------------------------------

    def apply(self, ops: Sequence[StoreOp]) -> list[Any]:
        """Apply `ops` in one transaction; returns one result (or exception) per op.

        If the batch fails for what is in it (a constraint, a value Arrow or DuckDB cannot hold),
        each op is retried in its own transaction so one bad record cannot take the others down.
        If it fails for want of memory or disk, StoreUnavailable is raised, carrying the results
        of the ops committed before it (in the one-by-one pass): the caller retries the rest later.
        """
        try:
            self.con.begin()
            results = self._apply(ops)
            self.con.commit()
            return results
        except Exception as batch_error:
            self._roll_back()
            if isinstance(batch_error, _RESOURCE_ERRORS) or _is_resource_error(batch_error):
                raise StoreUnavailable(f"{type(batch_error).__name__}: {batch_error}") from batch_error
            if len(ops) == 1:
                log.error("store write failed: %s (%r)", batch_error, ops[0])
                return [batch_error]
            log.warning("batch of %d failed (%s); retrying one by one", len(ops), batch_error)
            results: list[Any] = []
            for op in ops:
                try:
                    results.append(self.apply([op])[0])
                except StoreUnavailable as unavailable:  # what is committed stays committed, once
                    raise StoreUnavailable(str(unavailable), results) from unavailable
            return results

    def _roll_back(self) -> None:
        self._episodes.clear()  # it may hold seqs the rollback undid
        try:
            self.con.rollback()
        except duckdb.Error:  # no transaction open (begin itself failed), or the connection is gone
            pass

    def _apply(self, ops: Sequence[StoreOp]) -> list[Any]:
        calls = [op for op in ops if isinstance(op, CallRecord)]
        self._open_episodes(ops)
        if calls:
            self._insert_calls(calls)
        results: list[Any] = []
        for op in ops:
            if isinstance(op, Feedback):
                results.append(self._feedback(op))
            elif isinstance(op, EpisodeClose):
                results.append(self._close(op))
            elif isinstance(op, InfraError):
                results.append(self._infra_error(op))
            elif isinstance(op, GradeFailed):
                self.con.execute("UPDATE episodes SET grade_failed_at = ?, grade_error = ? WHERE episode_id = ?",
                                 [op.failed_at, op.error, op.episode_id])
                results.append(None)
            elif isinstance(op, EpisodeQuarantined):
                self.con.execute("UPDATE episodes SET quarantined_at = ?, push_error = ? WHERE episode_id = ?",
                                 [op.quarantined_at, op.error, op.episode_id])
                results.append(None)
            elif isinstance(op, EpisodesPushed):
                self.con.execute("UPDATE episodes SET pushed_at = ? WHERE episode_id IN (SELECT unnest(?))",
                                 [op.pushed_at, list(op.episode_ids)])
                results.append(None)
            elif isinstance(op, (TrainRun, PassthroughRecord)):
                self._insert_rows(TRAIN_RUNS if isinstance(op, TrainRun) else PASSTHROUGH, [asdict(op)])
                results.append(None)
            elif isinstance(op, AdapterRow):
                self._insert_rows(ADAPTERS, [asdict(op)],
                                  "ON CONFLICT (served_name) DO UPDATE SET status = excluded.status, live_at = excluded.live_at, "
                                  "decided_at = excluded.decided_at, reason = excluded.reason, "
                                  "comparison = excluded.comparison")
                results.append(None)
            else:
                results.append(None)
        return results

    def _open_episodes(self, ops: Sequence[StoreOp]) -> None:
        """Create the episodes these ops name; learn each one's next seq and whether it has a task."""
        first: dict[str, dict[str, Any]] = {}
        for op in ops:
            if isinstance(op, (EpisodeOpen, CallRecord)):
                row = dict(episode_id=op.episode_id, task_id=op.task_id, agent=op.agent,
                           created_at=op.created_at, metadata=getattr(op, "metadata", None))
                seen = first.setdefault(op.episode_id, row)
                if seen is not row:  # the first op names the episode; later ones fill gaps
                    for key, value in row.items():
                        if seen[key] is None:
                            seen[key] = value
        if not first:
            return
        rows = [dict(r, status="open", closed_at=None, reward=None) for r in first.values()]
        created = {r[0] for r in self._insert_rows(
            EPISODES, rows, "ON CONFLICT (episode_id) DO NOTHING RETURNING episode_id")}
        for episode_id in created:
            self._episodes[episode_id] = _EpisodeState(next_seq=0, has_task=first[episode_id]["task_id"] is not None)
        self._load_episode_states([e for e in first if e not in self._episodes])
        late_tasks = [(e, r["task_id"]) for e, r in first.items()
                      if r["task_id"] is not None and not self._episodes[e].has_task]
        if late_tasks:  # an episode opened without a task, now named by a later call
            self.con.executemany(
                "UPDATE episodes SET task_id = ? WHERE episode_id = ? AND task_id IS NULL",
                [(task, episode) for episode, task in late_tasks],
            )
            for episode, _ in late_tasks:
                self._episodes[episode].has_task = True
        while len(self._episodes) > _EPISODE_CACHE:
            self._episodes.popitem(last=False)

    def _load_episode_states(self, episode_ids: list[str]) -> None:
        """Episodes that existed before this process, or fell out of the cache (rare)."""
        if not episode_ids:
            return
        found = self.con.execute(
            "SELECT e.episode_id, e.task_id IS NOT NULL, coalesce(max(c.seq) + 1, 0) "
            "FROM episodes e LEFT JOIN calls c USING (episode_id) "
            "WHERE e.episode_id IN (SELECT unnest($1)) GROUP BY ALL",
            [episode_ids],
        ).fetchall()
        for episode_id, has_task, next_seq in found:
            self._episodes[episode_id] = _EpisodeState(next_seq=next_seq, has_task=has_task)

    def _insert_calls(self, calls: list[CallRecord]) -> None:
        rows = []
        for call in calls:
            row = {name: getattr(call, name) for name in _CALL_FIELDS}
            state = self._episodes[call.episode_id]
            if call.seq is None:
                row["seq"] = state.next_seq
                state.next_seq += 1
            self._episodes.move_to_end(call.episode_id)
            rows.append(row)
        self._insert_rows(CALLS, rows)
        self._mark_infra_error([(f"the upstream failed call {c.call_id}: {c.status} {(c.error or '')[:200]}",
                                 c.episode_id) for c in calls if c.status >= 500])

    def _mark_infra_error(self, reasons: list[tuple[str, str]]) -> None:
        """Episodes whose outcome says nothing about the model: (reason, episode id); the first reason stays."""
        if reasons:
            self.con.executemany("UPDATE episodes SET infra_error = ? WHERE episode_id = ? AND infra_error IS NULL",
                                 reasons)

    def _infra_error(self, op: InfraError) -> None | Exception:
        try:
            self._require_episode(op.episode_id)
        except UnknownEpisode as missing:
            return missing
        self._mark_infra_error([(op.reason, op.episode_id)])
        return None

    def _insert_rows(self, table: Table, rows: list[dict[str, Any]], suffix: str = "") -> list[tuple]:
        """Bulk insert through Arrow: ~20x faster than executemany for list columns."""
        self.con.register("_new_rows", pa.Table.from_pylist(rows, schema=table.arrow_schema()))
        try:
            names = ", ".join(table.column_names)
            return self.con.execute(
                f"INSERT INTO {table.name} ({names}) SELECT {names} FROM _new_rows {suffix}"
            ).fetchall()
        finally:
            self.con.unregister("_new_rows")

    def _require_episode(self, episode_id: str) -> None:
        if not self.con.execute(
            "SELECT 1 FROM episodes WHERE episode_id = ?", [episode_id]
        ).fetchone():
            raise UnknownEpisode(f"episode {episode_id!r} does not exist")

    def _feedback(self, fb: Feedback) -> FeedbackResult | Exception:
        try:
            self._require_episode(fb.episode_id)
            if fb.call_id is not None and not self.con.execute(
                "SELECT 1 FROM calls WHERE call_id = ? AND episode_id = ?", [fb.call_id, fb.episode_id]
            ).fetchone():
                raise UnknownCall(f"call {fb.call_id!r} is not part of episode {fb.episode_id!r}")
        except LookupError as missing:
            return missing
        if fb.idempotency_key is not None:
            seen = self.con.execute(
                "SELECT feedback_id FROM feedback WHERE episode_id = ? AND idempotency_key = ?",
                [fb.episode_id, fb.idempotency_key],
            ).fetchone()
            if seen:
                return FeedbackResult(seen[0], True, self._episode_reward(fb.episode_id))
        self.con.execute(
            "INSERT INTO feedback (feedback_id, episode_id, call_id, reward, dims, source, created_at, "
            "idempotency_key, grader_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [fb.feedback_id, fb.episode_id, fb.call_id, fb.reward, fb.dims, fb.source,
             fb.created_at, fb.idempotency_key, fb.grader_version],
        )
        if fb.grader_version is not None:  # graded at last: an earlier failure no longer stands
            self.con.execute("UPDATE episodes SET grade_failed_at = NULL, grade_error = NULL WHERE episode_id = ?",
                             [fb.episode_id])
        if fb.call_id is None:
            self.con.execute(
                "UPDATE episodes SET reward = ? WHERE episode_id = ?", [fb.reward, fb.episode_id]
            )
        return FeedbackResult(fb.feedback_id, False, self._episode_reward(fb.episode_id))

    def _episode_reward(self, episode_id: str) -> float | None:
        return self.con.execute(
            "SELECT reward FROM episodes WHERE episode_id = ?", [episode_id]
        ).fetchone()[0]

    def _close(self, op: EpisodeClose) -> None | Exception:
        try:
            self._require_episode(op.episode_id)
        except UnknownEpisode as missing:
            return missing
        self.con.execute(
            "UPDATE episodes SET status = 'closed', closed_at = coalesce(closed_at, ?) "
            "WHERE episode_id = ?",
            [op.closed_at, op.episode_id],
        )
        return None

    # ---- reads (any thread, own cursor: store/sandbox.py) -------------------

    def query(self, sql: str, max_rows: int, timeout_s: float) -> dict[str, Any]:
        """One read-only statement (`sandbox.read_only_query`): {columns, types, rows, truncated}."""
        return read_only_query(self.con, sql, max_rows, timeout_s)

    def query_json(self, sql: str, max_rows: int, max_bytes: int, timeout_s: float) -> bytes:
        """The same, encoded as POST /v1/sql's JSON reply, capped at `max_bytes` of rows."""
        return read_only_json(self.con, sql, max_rows, max_bytes, timeout_s)

    def summaries_json(self, queries: dict[str, str], max_rows: int, max_bytes: int, timeout_s: float) -> bytes:
        """Several read-only queries as one JSON object: {name: `query_json`'s reply}."""
        parts = [orjson.dumps(name) + b":" + self.query_json(sql, max_rows, max_bytes, timeout_s)
                 for name, sql in queries.items()]
        return b"{" + b",".join(parts) + b"}"

    def _dicts(self, sql: str, params: list | dict, timeout_s: float = 60) -> list[dict[str, Any]]:
        columns, rows = read_raw(self.con, lambda cur: cur.execute(sql, params), timeout_s)
        return [dict(zip(columns, row)) for row in rows]

    def episodes_to_push(self, limit: int, quiet_s: float, await_grade: tuple[str, str, bool] | None = None,
                         busy: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Rewarded episodes the learner has not acknowledged: closed ones, and open ones whose
        last feedback is older than `quiet_s`. Each with its `calls` and `feedback` (raw values).
        Evaluation episodes (metadata `{"eval": true}`) are never pushed: held-out data stays held out;
        nor are those with an `infra_error`: their outcome is not the model's doing.
        `await_grade` (grader source, version, every): only episodes that grader has scored or given
        up on; all of them if `every`, else those with shadow samples (their grades are the point).
        `busy`: episodes whose shadow samples are still being drawn, left for later."""
        graded = ("(e.grade_failed_at IS NOT NULL OR EXISTS (SELECT 1 FROM feedback g WHERE g.episode_id = e.episode_id "
                  "AND g.source = $source AND g.grader_version = $version))")
        if await_grade is None:
            graded = ""
        elif not await_grade[2]:  # an open episode is pushed once quiet (the grader grades closed ones only)
            graded = f"(e.status <> 'closed' OR NOT EXISTS (SELECT 1 FROM calls s WHERE s.episode_id = e.episode_id " \
                     f"AND s.shadow_of IS NOT NULL) OR {graded})"
        source, version, _ = await_grade or (None, None, None)
        episodes = self._dicts(
            "SELECT e.* FROM episodes e WHERE e.pushed_at IS NULL AND e.quarantined_at IS NULL AND "
            "e.infra_error IS NULL AND "
            f"e.reward IS NOT NULL AND {graded + ' AND ' if graded else ''}"
            f"NOT {IS_EVAL_EPISODE} AND e.episode_id NOT IN (SELECT unnest($busy::VARCHAR[])) AND "
            "(e.status = 'closed' OR (SELECT max(f.created_at) FROM feedback f WHERE f.episode_id = e.episode_id)"
            " < now() - to_seconds($quiet_s)) ORDER BY e.created_at LIMIT $limit",
            {"quiet_s": quiet_s, "limit": limit, "busy": list(busy),
             **({"source": source, "version": version} if await_grade else {})},
        )
        if not episodes:
            return []
        ids = [e["episode_id"] for e in episodes]
        calls = self._dicts("SELECT * FROM calls WHERE episode_id IN (SELECT unnest(?)) ORDER BY seq", [ids])
        feedback = self._dicts(
            "SELECT * FROM feedback WHERE episode_id IN (SELECT unnest(?)) ORDER BY created_at", [ids])
        by_id = {e["episode_id"]: {**e, "calls": [], "feedback": []} for e in episodes}
        for call in calls:
            by_id[call["episode_id"]]["calls"].append(call)
        for fb in feedback:
            by_id[fb["episode_id"]]["feedback"].append(fb)
        return list(by_id.values())

    def episodes_to_grade(self, source: str, version: str, unrewarded_only: bool, wait_s: float,
                          since: datetime | None, failed_before: datetime | None, limit: int,
                          busy: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Closed episodes (closed `wait_s` ago or more) that `source` has not scored under
        `version`, oldest closed first, each with its generation `calls` (seq order) and
        `feedback_reward`, its latest episode-level reward from any other source (None without).
        `unrewarded_only`: only episodes no other source rewarded, or that have shadow samples.
        Episodes the grader gave up on are left out, unless that was before `failed_before`;
        `since`: created at or after; `busy`: episodes whose shadow samples are still being drawn."""
        episodes = self._dicts(
            "SELECT e.episode_id, e.task_id, e.metadata FROM episodes e "
            "WHERE e.status = 'closed' AND e.closed_at <= now() - to_seconds($wait_s) "
            "AND (e.grade_failed_at IS NULL OR e.grade_failed_at < $failed_before::TIMESTAMPTZ) "
            "AND ($since::TIMESTAMPTZ IS NULL OR e.created_at >= $since::TIMESTAMPTZ) "
            "AND e.episode_id NOT IN (SELECT unnest($busy::VARCHAR[])) "
            "AND NOT EXISTS (SELECT 1 FROM feedback f WHERE f.episode_id = e.episode_id AND f.source = $source "
            "                AND f.grader_version = $version) "
            "AND NOT ($unrewarded_only AND EXISTS (SELECT 1 FROM feedback f WHERE f.episode_id = e.episode_id "
            "                                      AND f.source IS DISTINCT FROM $source) "
            "         AND NOT EXISTS (SELECT 1 FROM calls s WHERE s.episode_id = e.episode_id "
            "                         AND s.shadow_of IS NOT NULL)) "
            "AND EXISTS (SELECT 1 FROM calls c WHERE c.episode_id = e.episode_id) "
            "ORDER BY e.closed_at, e.episode_id LIMIT $limit",
            {"wait_s": wait_s, "failed_before": failed_before, "since": since, "source": source, "version": version,
             "unrewarded_only": unrewarded_only, "limit": limit, "busy": list(busy)})
        return self._with_calls(episodes, source)

    def episodes_with_calls(self, episode_ids: list[str], source: str) -> list[dict[str, Any]]:
        """These episodes (those that exist, in the order given), shaped as `episodes_to_grade`'s."""
        found = {e["episode_id"]: e for e in self._dicts(
            "SELECT episode_id, task_id, metadata FROM episodes WHERE episode_id IN (SELECT unnest($ids))",
            {"ids": episode_ids})}
        return self._with_calls([found[i] for i in episode_ids if i in found], source)

    def _with_calls(self, episodes: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
        if not episodes:
            return []
        ids = [e["episode_id"] for e in episodes]
        calls = self._dicts("SELECT call_id, episode_id, agent, seq, endpoint, request, response, status, shadow_of "
                            "FROM calls "
                            "WHERE episode_id IN (SELECT unnest($ids)) ORDER BY seq", {"ids": ids})
        rewards = {row["episode_id"]: row["reward"] for row in self._dicts(
            "SELECT episode_id, arg_max(reward, created_at) AS reward FROM feedback "
            "WHERE episode_id IN (SELECT unnest($ids)) AND call_id IS NULL AND source IS DISTINCT FROM $source "
            "GROUP BY episode_id", {"ids": ids, "source": source})}
        by_id = {e["episode_id"]: {**e, "calls": [], "feedback_reward": rewards.get(e["episode_id"])} for e in episodes}
        for call in calls:
            by_id[call["episode_id"]]["calls"].append(call)
        return list(by_id.values())

    def shadow_origin(self, call_id: str) -> dict[str, Any] | None:
        """What deciding on a call's shadow samples needs: its `seq`, its episode's `task_id` and
        whether that is an evaluation episode (`eval`); None if the call is not stored."""
        found = self._dicts(f"SELECT c.seq, e.task_id, {IS_EVAL_EPISODE} AS eval FROM calls c "
                            "JOIN episodes e USING (episode_id) WHERE c.call_id = $id AND c.shadow_of IS NULL",
                            {"id": call_id})
        return found[0] if found else None

    def version_rewards(self, agent: str, since: datetime) -> list[ServedReward]:
        """(model or adapter served, reward, is eval) of each rewarded episode opened since `since`
        whose calls of `agent` all went to one model or adapter, oldest first: the outcomes a canary
        comparison or a watch weighs. Episodes with an infra_error (the outcome is not the model's) and shadow samples
        (never seen by a client) do not count."""
        rows = self._dicts(f"""
            SELECT any_value(c.adapter) AS adapter, any_value(e.reward) AS reward,
                   any_value({IS_EVAL_EPISODE}) AS is_eval, any_value(e.created_at) AS created_at
            FROM episodes e JOIN calls c USING (episode_id)
            WHERE c.agent = $agent AND c.shadow_of IS NULL AND e.created_at >= $since
              AND e.reward IS NOT NULL AND e.infra_error IS NULL
            GROUP BY e.episode_id
            HAVING count(DISTINCT c.adapter) = 1
            ORDER BY min(c.created_at)""", {"agent": agent, "since": since})
        return [ServedReward(row["adapter"], row["reward"], bool(row["is_eval"]), row["created_at"]) for row in rows]

    def adapter_rows(self) -> list[AdapterRow]:
        """The whole adapter registry, oldest first (read once at start-up)."""
        return [AdapterRow(**row) for row in self._dicts("SELECT * FROM adapters ORDER BY agent, version", [])]

    def episode(self, episode_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """The episode row with its calls (in seq order) and feedback."""

        def rows(sql: str) -> list[dict[str, Any]]:
            out = read(self.con, lambda cur: cur.execute(sql, [episode_id]), 100_000, timeout_s)
            return [dict(zip(out["columns"], row)) for row in out["rows"]]

        found = rows("SELECT * FROM episodes WHERE episode_id = ?")
        if not found:
            raise UnknownEpisode(f"episode {episode_id!r} does not exist")
        return {
            **found[0],
            "calls": rows("SELECT * FROM calls WHERE episode_id = ? ORDER BY seq"),
            "feedback": rows("SELECT * FROM feedback WHERE episode_id = ? ORDER BY created_at"),
        }


def migrate(con: duckdb.DuckDBPyConnection) -> None:
    """Create missing tables and columns, then record SCHEMA_VERSION. Refuses a newer file."""
    con.execute(META.ddl())
    row = con.execute("SELECT value FROM flywheel_meta WHERE key = 'schema_version'").fetchone()
    found = int(row[0]) if row else 0
    if found > SCHEMA_VERSION:
        raise RuntimeError(
            f"store schema version {found} is newer than this Flywheel's {SCHEMA_VERSION}; upgrade Flywheel"
        )
    for table in TABLES:
        con.execute(table.ddl())
        have = {r[0] for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table.name]
        ).fetchall()}
        for column in table.columns:
            if column.name not in have:
                con.execute(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {column.sql_type}")
                if column.backfill:  # rows written before the column existed
                    con.execute(f"UPDATE {table.name} SET {column.name} = {column.backfill}")
    con.execute(
        "INSERT INTO flywheel_meta VALUES ('schema_version', ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [str(SCHEMA_VERSION)],
    )
