"""What the two stores share: the write path's transaction and retry semantics, how each op
lands, and the reads, as SQL that DuckDB and PostgreSQL both accept.

`StoreBase` holds it once; `Store` (DuckDB, store/db.py) and `PostgresStore` (store/postgres.py)
supply the connection-level hooks: transactions, statements, bulk inserts, how an episode's
next seq is learnt (and, on PostgreSQL, the episode rows locked), which errors mean "cannot
write now", and the read-only SQL sandbox. Statements here take `?` or `$name` parameters
(PostgresStore translates them to psycopg's); list parameters are cast (`?::VARCHAR[]`), since
PostgreSQL cannot guess their type. Where the dialects differ in SQL (what an evaluation
episode is), the difference is named in `schema.Dialect`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any, Sequence

import orjson

from flywheel.store.records import (
    CONTENT_FIELDS,
    WITHHELD_ERROR,
    AdapterRow,
    AuditEntry,
    CallRecord,
    Erase,
    Erased,
    QuotaUsage,
    StripContent,
    Untrainable,
    EpisodeClose,
    EpisodeOpen,
    EpisodeQuarantined,
    EpisodesPushed,
    Feedback,
    FeedbackResult,
    GradeFailed,
    InfraError,
    PassthroughRecord,
    ServedReward,
    StoreOp,
    StoreUnavailable,
    TrainRun,
    UnknownCall,
    UnknownEpisode,
)
from flywheel.store.schema import (
    ADAPTERS,
    AUDIT_LOG,
    CALLS,
    EPISODES,
    IS_EVAL_EPISODE,
    PASSTHROUGH,
    QUOTA_IN_PROGRESS,
    QUOTA_USAGE,
    TRAIN_RUNS,
    Dialect,
    Table,
)

log = logging.getLogger("flywheel.store")

_CALL_FIELDS = [f.name for f in fields(CallRecord) if f.name in CALLS.column_names]
_ADAPTER_FIELDS = ", ".join(f.name for f in fields(AdapterRow))
# an adapter row is written whole on every change; its identity (name, agent, version, path) stays
_ADAPTER_UPSERT = ("ON CONFLICT (served_name) DO UPDATE SET status = excluded.status, live_at = excluded.live_at, "
                   "decided_at = excluded.decided_at, reason = excluded.reason, comparison = excluded.comparison, "
                   "updated_at = excluded.updated_at")


@dataclass
class EpisodeState:
    next_seq: int
    has_task: bool


def insert_select(table: Table, source: str, suffix: str, casts: dict[str, str] | None = None) -> str:
    """INSERT INTO `table` the rows of `source` (same column names), each column cast per `casts`
    (spec type -> SQL type) where the source holds it in another type."""
    casts = casts or {}
    names = ", ".join(table.column_names)
    values = ", ".join(f"{c.name}::{casts[c.sql_type]}" if c.sql_type in casts else c.name for c in table.columns)
    return f"INSERT INTO {table.name} ({names}) SELECT {values} FROM {source} {suffix}"


class StoreBase(ABC):
    """The store's public interface and every part of it the two databases share."""

    dialect: Dialect
    # whether other processes write the same store (PostgreSQL: several proxies), so that a proxy
    # follows the registry changes they make (`adapters_changed_at`)
    shared = False
    # what an insert of calls does with a call already stored (a batch retried after a lost commit
    # acknowledgement); only a database that keeps call ids unique can say
    calls_conflict = ""

    # ---- hooks: one connection's transaction and statements -----------------

    @abstractmethod
    def _begin(self) -> None:
        """Open the writer's transaction for one batch."""

    @abstractmethod
    def _commit(self) -> None:
        """Commit it; raises if the database did not."""

    @abstractmethod
    def _roll_back(self) -> None:
        """Roll the writer's transaction back; never raises."""

    @abstractmethod
    def _execute(self, sql: str, params: Sequence | dict = ()) -> list[tuple]:
        """One statement on the writer's transaction; its rows (empty if it returns none)."""

    @abstractmethod
    def _executemany(self, sql: str, rows: list[tuple]) -> None:
        """One statement per row of parameters, on the writer's transaction."""

    @abstractmethod
    def _insert_rows(self, table: Table, rows: list[dict[str, Any]], suffix: str = "") -> list[tuple]:
        """Bulk insert (`suffix`: ON CONFLICT ... / RETURNING ...); the rows RETURNING gives."""

    @abstractmethod
    def _is_unavailable(self, error: Exception) -> bool:
        """Whether `error` means the store cannot write now (memory, disk, connection), not a bad record."""

    @abstractmethod
    def _episode_states(self, ops: Sequence[StoreOp], opened: dict[str, dict[str, Any]],
                        created: set[str]) -> dict[str, EpisodeState]:
        """The next seq of each episode in `opened` (its row as the batch names it) and whether it
        has a task; `created`: those this batch created."""

    @abstractmethod
    def _change_time(self) -> datetime:
        """The `adapters.updated_at` of a row written now: later than any committed one."""

    @abstractmethod
    def _dicts(self, sql: str, params: Sequence | dict, timeout_s: float = 60) -> list[dict[str, Any]]:
        """Rows of a read-only query, values as the database driver gives them (JSON as text)."""

    @abstractmethod
    def _json_rows(self, sql: str, params: Sequence, timeout_s: float) -> list[dict[str, Any]]:
        """Rows of a read-only query with JSON-ready values, as POST /v1/sql shows them."""

    @abstractmethod
    def query(self, sql: str, max_rows: int, timeout_s: float) -> dict[str, Any]:
        """One read-only statement of a user's (sandboxed): {columns, types, rows, truncated}."""

    @abstractmethod
    def query_json(self, sql: str, max_rows: int, max_bytes: int, timeout_s: float) -> bytes:
        """The same, encoded as POST /v1/sql's JSON reply, capped at `max_bytes` of rows."""

    @abstractmethod
    def close(self) -> None:
        """Close every connection (the writer has committed what it had)."""

    # ---- writes (one thread) ------------------------------------------------

    def apply(self, ops: Sequence[StoreOp]) -> list[Any]:
        """Apply `ops` in one transaction; returns one result (or exception) per op, once committed.

        If the batch fails for what is in it (a constraint, a value the database cannot hold),
        each op is retried in its own transaction so one bad record cannot take the others down.
        If it fails for want of memory, disk or connection, StoreUnavailable is raised, carrying
        the results of the ops committed before it (in the one-by-one pass): the caller retries
        the rest later.
        """
        try:
            self._begin()
            results = self._apply(ops)
            self._commit()
            return results
        except Exception as batch_error:
            self._roll_back()
            if self._is_unavailable(batch_error):
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

    def _apply(self, ops: Sequence[StoreOp]) -> list[Any]:
        calls = [op for op in ops if isinstance(op, CallRecord)]
        states = self._open_episodes(ops)
        if calls:
            self._insert_calls(calls, states)
        results: list[Any] = []
        for op in ops:
            if isinstance(op, Feedback):
                results.append(self._feedback(op))
            elif isinstance(op, EpisodeClose):
                results.append(self._close(op))
            elif isinstance(op, InfraError):
                results.append(self._infra_error(op))
            elif isinstance(op, GradeFailed):
                self._execute("UPDATE episodes SET grade_failed_at = ?, grade_error = ? WHERE episode_id = ?",
                              [op.failed_at, op.error, op.episode_id])
                results.append(None)
            elif isinstance(op, EpisodeQuarantined):
                self._execute("UPDATE episodes SET quarantined_at = ?, push_error = ? WHERE episode_id = ?",
                              [op.quarantined_at, op.error, op.episode_id])
                results.append(None)
            elif isinstance(op, EpisodesPushed):
                self._execute("UPDATE episodes SET pushed_at = ? WHERE episode_id IN (SELECT unnest(?::VARCHAR[]))",
                              [op.pushed_at, list(op.episode_ids)])
                results.append(None)
            elif isinstance(op, Erase):
                results.append(self._erase(op))
            elif isinstance(op, Untrainable):
                self._mark_untrainable([op.episode_id])
                results.append(None)
            elif isinstance(op, QuotaUsage):
                results.append(self._quota_usage(op))
            elif isinstance(op, StripContent):
                results.append(self._strip_content(op))
            elif isinstance(op, AuditEntry):
                self._insert_rows(AUDIT_LOG, [asdict(op)])
                results.append(None)
            elif isinstance(op, (TrainRun, PassthroughRecord)):  # a retried batch writes them once
                self._insert_rows(TRAIN_RUNS if isinstance(op, TrainRun) else PASSTHROUGH, [asdict(op)],
                                  "ON CONFLICT DO NOTHING")
                results.append(None)
            elif isinstance(op, AdapterRow):
                self._insert_rows(ADAPTERS, [dict(asdict(op), updated_at=self._change_time())], _ADAPTER_UPSERT)
                results.append(None)
            else:
                results.append(None)
        return results

    def _open_episodes(self, ops: Sequence[StoreOp]) -> dict[str, EpisodeState]:
        """Create the episodes these ops name; each one's next seq and whether it has a task."""
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
        created: set[str] = set()
        if first:  # in id order: two writers creating the same episodes wait on each other in one order
            rows = [dict(first[e], status="open", closed_at=None, reward=None, train=True) for e in sorted(first)]
            created = {r[0] for r in self._insert_rows(
                EPISODES, rows, "ON CONFLICT (episode_id) DO NOTHING RETURNING episode_id")}
        states = self._episode_states(ops, first, created)
        late_tasks = [(r["task_id"], e) for e, r in first.items() if r["task_id"] is not None and not states[e].has_task]
        if late_tasks:  # an episode opened without a task, now named by a later call
            self._executemany("UPDATE episodes SET task_id = ? WHERE episode_id = ? AND task_id IS NULL", late_tasks)
            for _, episode in late_tasks:
                states[episode].has_task = True
        return states

    def _load_episode_states(self, episode_ids: list[str]) -> dict[str, EpisodeState]:
        """The stored state of these episodes (those that exist)."""
        if not episode_ids:
            return {}
        found = self._execute(
            "SELECT e.episode_id, e.task_id IS NOT NULL, coalesce(max(c.seq) + 1, 0) "
            "FROM episodes e LEFT JOIN calls c ON c.episode_id = e.episode_id "
            "WHERE e.episode_id IN (SELECT unnest(?::VARCHAR[])) GROUP BY e.episode_id, e.task_id",
            [episode_ids])
        return {episode_id: EpisodeState(next_seq, has_task) for episode_id, has_task, next_seq in found}

    def _insert_calls(self, calls: list[CallRecord], states: dict[str, EpisodeState]) -> None:
        rows = []
        for call in calls:
            row = {name: getattr(call, name) for name in _CALL_FIELDS}
            if call.seq is None:
                state = states[call.episode_id]
                row["seq"] = state.next_seq
                state.next_seq += 1
            rows.append(row)
        self._insert_rows(CALLS, rows, self.calls_conflict)
        # a policy that forbids training on one call keeps its whole episode from the learner
        self._mark_untrainable(sorted({c.episode_id for c in calls if not c.train}))
        self._mark_infra_error([(f"the upstream failed call {c.call_id}: {c.status} {(c.error or '')[:200]}",
                                 c.episode_id) for c in calls if c.status >= 500])

    def _mark_infra_error(self, reasons: list[tuple[str, str]]) -> None:
        """Episodes whose outcome says nothing about the model: (reason, episode id); the first reason stays."""
        if reasons:
            self._executemany("UPDATE episodes SET infra_error = ? WHERE episode_id = ? AND infra_error IS NULL",
                              reasons)

    def _mark_untrainable(self, episode_ids: list[str]) -> None:
        """These episodes (those stored) may no longer be trained on."""
        if episode_ids:
            self._execute("UPDATE episodes SET train = false WHERE episode_id IN (SELECT unnest(?::VARCHAR[])) "
                          "AND train", [episode_ids])

    def _erase(self, op: Erase) -> Erased:
        """Delete the episodes, every row that names them and the judge's episodes that quote them
        (metadata {"flywheel": "judge", "judged": [ids]}); the audit row says how many rows."""
        ids = list(op.episode_ids)
        judges = [row[0] for row in self._execute(
            "SELECT episode_id FROM episodes WHERE metadata->>'flywheel' = 'judge' AND "
            f"{self.dialect.json_list_has_any.format(json='metadata', key='judged')}", [ids])] if ids else []
        gone = [ids + judges]

        def delete(table: str) -> int:
            return len(self._execute(f"DELETE FROM {table} WHERE episode_id IN (SELECT unnest(?::VARCHAR[])) "
                                     "RETURNING 1", gone))

        episodes = delete("episodes")
        erased = Erased(episodes - len(judges), delete("calls"), delete("feedback"), delete("passthrough"), len(judges))
        self._insert_rows(AUDIT_LOG, [dict(asdict(op.audit), row_count=erased.rows)])
        return erased

    def _quota_usage(self, op: QuotaUsage) -> dict[str, tuple[int, int, int]]:
        """Add this proxy's counts and in-progress calls, drop expired ones, and return the other
        proxies' (calls, tokens, in progress) by subject."""
        if op.counts:
            self._insert_rows(QUOTA_USAGE, [dict(subject=subject, proxy=op.proxy, counted_at=second, calls=calls,
                                                 tokens=tokens) for subject, second, calls, tokens in op.counts],
                              "ON CONFLICT (subject, proxy, counted_at) DO UPDATE SET calls = quota_usage.calls + "
                              "excluded.calls, tokens = quota_usage.tokens + excluded.tokens")
        if op.in_progress:
            self._insert_rows(QUOTA_IN_PROGRESS, [dict(subject=subject, proxy=op.proxy, in_progress=calls,
                                                       reported_at=op.at) for subject, calls in op.in_progress],
                              "ON CONFLICT (subject, proxy) DO UPDATE SET in_progress = excluded.in_progress, "
                              "reported_at = excluded.reported_at")
        self._execute("DELETE FROM quota_usage WHERE counted_at < ?", [op.since])
        self._execute("DELETE FROM quota_in_progress WHERE reported_at < ?", [op.reported_after])
        totals: dict[str, list[int]] = {}
        for subject, calls, tokens in self._execute("SELECT subject, sum(calls), sum(tokens) FROM quota_usage "
                                                    "WHERE proxy <> ? GROUP BY subject", [op.proxy]):
            totals[subject] = [int(calls), int(tokens), 0]
        for subject, calls in self._execute("SELECT subject, sum(in_progress) FROM quota_in_progress "
                                            "WHERE proxy <> ? GROUP BY subject", [op.proxy]):
            totals.setdefault(subject, [0, 0, 0])[2] = int(calls)
        return {subject: (calls, tokens, busy) for subject, (calls, tokens, busy) in totals.items()}

    def _strip_content(self, op: StripContent) -> int:
        """Content retention on these episodes' calls older than `op.before`; how many calls."""
        ids = list(op.episode_ids)
        cleared = ", ".join(f"{name} = NULL" for name in CONTENT_FIELDS)
        stripped = len(self._execute(
            f"UPDATE calls SET {cleared}, error = CASE WHEN error IS NULL THEN NULL ELSE ? END, stored = 'metadata' "
            "WHERE episode_id IN (SELECT unnest(?::VARCHAR[])) AND created_at < ? AND stored = 'full' RETURNING 1",
            [WITHHELD_ERROR, ids, op.before]))
        self._mark_untrainable(ids)
        self._insert_rows(AUDIT_LOG, [dict(asdict(op.audit), row_count=stripped)])
        return stripped

    def _infra_error(self, op: InfraError) -> None | Exception:
        try:
            self._require_episode(op.episode_id)
        except UnknownEpisode as missing:
            return missing
        self._mark_infra_error([(op.reason, op.episode_id)])
        return None

    def _require_episode(self, episode_id: str) -> None:
        if not self._execute("SELECT 1 FROM episodes WHERE episode_id = ?", [episode_id]):
            raise UnknownEpisode(f"episode {episode_id!r} does not exist")

    def _feedback(self, fb: Feedback) -> FeedbackResult | Exception:
        try:
            self._require_episode(fb.episode_id)
            if fb.call_id is not None and not self._execute(
                "SELECT 1 FROM calls WHERE call_id = ? AND episode_id = ?", [fb.call_id, fb.episode_id]
            ):
                raise UnknownCall(f"call {fb.call_id!r} is not part of episode {fb.episode_id!r}")
        except LookupError as missing:
            return missing
        if fb.idempotency_key is not None:
            seen = self._execute("SELECT feedback_id FROM feedback WHERE episode_id = ? AND idempotency_key = ?",
                                 [fb.episode_id, fb.idempotency_key])
            if seen:
                return FeedbackResult(seen[0][0], True, self._episode_reward(fb.episode_id))
        inserted = self._execute(
            "INSERT INTO feedback (feedback_id, episode_id, call_id, reward, dims, source, created_at, "
            "idempotency_key, grader_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING "
            "RETURNING feedback_id",
            [fb.feedback_id, fb.episode_id, fb.call_id, fb.reward, fb.dims, fb.source,
             fb.created_at, fb.idempotency_key, fb.grader_version],
        )
        if not inserted:  # this very feedback (its batch retried) or its idempotency key committed first
            [(first_id,)] = self._execute(
                "SELECT feedback_id FROM feedback WHERE feedback_id = ? OR (episode_id = ? AND idempotency_key = ?)",
                [fb.feedback_id, fb.episode_id, fb.idempotency_key])
            return FeedbackResult(first_id, True, self._episode_reward(fb.episode_id))
        if fb.grader_version is not None:  # graded at last: an earlier failure no longer stands
            self._execute("UPDATE episodes SET grade_failed_at = NULL, grade_error = NULL WHERE episode_id = ?",
                          [fb.episode_id])
        if fb.call_id is None:
            self._execute("UPDATE episodes SET reward = ? WHERE episode_id = ?", [fb.reward, fb.episode_id])
        return FeedbackResult(fb.feedback_id, False, self._episode_reward(fb.episode_id))

    def _episode_reward(self, episode_id: str) -> float | None:
        return self._execute("SELECT reward FROM episodes WHERE episode_id = ?", [episode_id])[0][0]

    def _close(self, op: EpisodeClose) -> None | Exception:
        try:
            self._require_episode(op.episode_id)
        except UnknownEpisode as missing:
            return missing
        self._execute("UPDATE episodes SET status = 'closed', closed_at = coalesce(closed_at, ?) WHERE episode_id = ?",
                      [op.closed_at, op.episode_id])
        return None

    # ---- reads (any thread) -------------------------------------------------

    def summaries_json(self, queries: dict[str, str], max_rows: int, max_bytes: int, timeout_s: float) -> bytes:
        """Several read-only queries as one JSON object: {name: `query_json`'s reply}."""
        parts = [orjson.dumps(name) + b":" + self.query_json(sql, max_rows, max_bytes, timeout_s)
                 for name, sql in queries.items()]
        return b"{" + b",".join(parts) + b"}"

    def try_lock(self, name: str) -> bool:
        """Take the store-wide lock `name` for one-time work (restoring the registry into vLLM),
        held until `close`; False if another process holds it. One process owns a DuckDB file,
        so there it is always True; PostgresStore overrides it."""
        return True

    def _push_filter(self, quiet_s: float, await_grade: tuple[str, str, bool] | None,
                     busy: Sequence[str]) -> tuple[str, dict[str, Any]]:
        """`episodes_to_push`'s condition on `episodes e`, and its parameters."""
        graded = ("(e.grade_failed_at IS NOT NULL OR EXISTS (SELECT 1 FROM feedback g WHERE g.episode_id = e.episode_id "
                  "AND g.source = $source AND g.grader_version = $version))")
        if await_grade is None:
            graded = ""
        elif not await_grade[2]:  # an open episode is pushed once quiet (the grader grades closed ones only)
            graded = f"(e.status <> 'closed' OR NOT EXISTS (SELECT 1 FROM calls s WHERE s.episode_id = e.episode_id " \
                     f"AND s.shadow_of IS NOT NULL) OR {graded})"
        source, version, _ = await_grade or (None, None, None)
        where = ("e.pushed_at IS NULL AND e.quarantined_at IS NULL AND e.infra_error IS NULL AND e.train AND "
                 f"e.reward IS NOT NULL AND {graded + ' AND ' if graded else ''}"
                 f"NOT {IS_EVAL_EPISODE} AND e.episode_id NOT IN (SELECT unnest($busy::VARCHAR[])) AND "
                 "(e.status = 'closed' OR (SELECT max(f.created_at) FROM feedback f WHERE f.episode_id = e.episode_id)"
                 " < now() - $quiet_s * INTERVAL '1 second')")
        return where, {"quiet_s": quiet_s, "busy": list(busy),
                       **({"source": source, "version": version} if await_grade else {})}

    def episodes_to_push(self, limit: int, quiet_s: float, await_grade: tuple[str, str, bool] | None = None,
                         busy: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Rewarded episodes the learner has not acknowledged: closed ones, and open ones whose
        last feedback is older than `quiet_s`. Each with its `calls` and `feedback` (raw values).
        Evaluation episodes (metadata `{"eval": true}`) are never pushed: held-out data stays held out;
        nor are those with an `infra_error`: their outcome is not the model's doing; nor those a policy keeps
        from training (`train` false).
        `await_grade` (grader source, version, every): only episodes that grader has scored or given
        up on; all of them if `every`, else those with shadow samples (their grades are the point).
        `busy`: episodes whose shadow samples are still being drawn, left for later.
        (PostgresStore also claims the episodes it returns, so that one proxy pushes each.)"""
        where, params = self._push_filter(quiet_s, await_grade, busy)
        episodes = self._dicts(f"SELECT e.* FROM episodes e WHERE {where} ORDER BY e.created_at, e.episode_id LIMIT $limit",
                               {**params, "limit": limit})
        return self._with_calls_and_feedback(episodes)

    def _with_calls_and_feedback(self, episodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not episodes:
            return []
        ids = [e["episode_id"] for e in episodes]
        calls = self._dicts("SELECT * FROM calls WHERE episode_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY seq", [ids])
        feedback = self._dicts(
            "SELECT * FROM feedback WHERE episode_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY created_at", [ids])
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
        Episodes the grader gave up on are left out, unless that was before `failed_before`, and so are those
        with a call stored as metadata only (nothing to grade);
        `since`: created at or after; `busy`: episodes whose shadow samples are still being drawn."""
        episodes = self._dicts(
            "SELECT e.episode_id, e.task_id, e.metadata FROM episodes e "
            "WHERE e.status = 'closed' AND e.closed_at <= now() - $wait_s * INTERVAL '1 second' "
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
            "AND NOT EXISTS (SELECT 1 FROM calls m WHERE m.episode_id = e.episode_id AND m.stored <> 'full') "
            "ORDER BY e.closed_at, e.episode_id LIMIT $limit",
            {"wait_s": wait_s, "failed_before": failed_before, "since": since, "source": source, "version": version,
             "unrewarded_only": unrewarded_only, "limit": limit, "busy": list(busy)})
        return self._with_calls(episodes, source)

    def episodes_with_calls(self, episode_ids: list[str], source: str) -> list[dict[str, Any]]:
        """These episodes (those that exist, in the order given), shaped as `episodes_to_grade`'s."""
        found = {e["episode_id"]: e for e in self._dicts(
            "SELECT episode_id, task_id, metadata FROM episodes WHERE episode_id IN (SELECT unnest($ids::VARCHAR[]))",
            {"ids": episode_ids})}
        return self._with_calls([found[i] for i in episode_ids if i in found], source)

    def _with_calls(self, episodes: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
        if not episodes:
            return []
        ids = [e["episode_id"] for e in episodes]
        calls = self._dicts("SELECT call_id, episode_id, agent, seq, endpoint, request, response, status, shadow_of "
                            "FROM calls "
                            "WHERE episode_id IN (SELECT unnest($ids::VARCHAR[])) ORDER BY seq", {"ids": ids})
        rewards = {row["episode_id"]: row["reward"] for row in self._dicts(
            "SELECT episode_id, (array_agg(reward ORDER BY created_at DESC))[1] AS reward FROM feedback "
            "WHERE episode_id IN (SELECT unnest($ids::VARCHAR[])) AND call_id IS NULL "
            "AND source IS DISTINCT FROM $source GROUP BY episode_id", {"ids": ids, "source": source})}
        by_id = {e["episode_id"]: {**e, "calls": [], "feedback_reward": rewards.get(e["episode_id"])} for e in episodes}
        for call in calls:
            by_id[call["episode_id"]]["calls"].append(call)
        return list(by_id.values())

    def shadow_origin(self, call_id: str) -> dict[str, Any] | None:
        """What deciding on a call's shadow samples needs: its `seq`, its episode's `task_id` and
        whether that is an evaluation episode (`eval`); None if the call is not stored."""
        found = self._dicts(f"SELECT c.seq, e.task_id, {IS_EVAL_EPISODE} AS eval FROM calls c "
                            "JOIN episodes e ON e.episode_id = c.episode_id "
                            "WHERE c.call_id = $id AND c.shadow_of IS NULL", {"id": call_id})
        return found[0] if found else None

    def version_rewards(self, agent: str, since: datetime) -> list[ServedReward]:
        """(model or adapter served, reward, is eval) of each rewarded episode opened since `since`
        whose calls of `agent` all went to one model or adapter, oldest first: the outcomes a canary
        comparison or a watch weighs. Episodes with an infra_error (the outcome is not the model's) and shadow samples
        (never seen by a client) do not count."""
        # min() and bool_and() of values that are one per episode (or, for the adapter, one per group)
        rows = self._dicts(f"""
            SELECT min(c.adapter) AS adapter, min(e.reward) AS reward,
                   bool_and({IS_EVAL_EPISODE}) AS is_eval, min(e.created_at) AS created_at
            FROM episodes e JOIN calls c ON c.episode_id = e.episode_id
            WHERE c.agent = $agent AND c.shadow_of IS NULL AND e.created_at >= $since
              AND e.reward IS NOT NULL AND e.infra_error IS NULL
            GROUP BY e.episode_id
            HAVING count(DISTINCT c.adapter) = 1
            ORDER BY min(c.created_at)""", {"agent": agent, "since": since})
        return [ServedReward(row["adapter"], row["reward"], bool(row["is_eval"]), row["created_at"]) for row in rows]

    def adapter_rows(self) -> list[AdapterRow]:
        """The whole adapter registry, oldest first (read at start-up, and when `adapters_changed_at` moves)."""
        return [AdapterRow(**row) for row in self._dicts(
            f"SELECT {_ADAPTER_FIELDS} FROM adapters ORDER BY agent, version", [])]

    def adapters_changed_at(self) -> datetime | None:
        """When the registry last changed (None: it is empty): cheap enough to poll every half
        second, so a proxy reloads `adapter_rows` only when another one changed it."""
        return self._dicts("SELECT max(updated_at) AS changed FROM adapters", [])[0]["changed"]

    def expired_episodes(self, before: datetime, limit: int, timeout_s: float = 60.0) -> list[str]:
        """Up to `limit` ids of episodes created before `before` (retention), oldest first."""
        return [r["episode_id"] for r in self._dicts(
            "SELECT episode_id FROM episodes WHERE created_at < ? ORDER BY created_at, episode_id LIMIT ?", [before, limit],
            timeout_s)]

    def episodes_with_old_content(self, before: datetime, limit: int, timeout_s: float = 60.0) -> list[str]:
        """Up to `limit` ids of episodes with a call made before `before` whose content is still stored."""
        return [r["episode_id"] for r in self._dicts(
            "SELECT DISTINCT episode_id FROM calls WHERE created_at < ? AND stored = 'full' ORDER BY episode_id "
            "LIMIT ?", [before, limit], timeout_s)]

    def episodes_with_metadata(self, metadata: dict[str, str], timeout_s: float = 60.0) -> list[str]:
        """Ids of the episodes whose metadata has every one of these keys with these values (as text)."""
        where = " AND ".join("metadata->>? = ?" for _ in metadata)
        params = [part for key, value in metadata.items() for part in (key, value)]
        return [r["episode_id"] for r in self._dicts(f"SELECT episode_id FROM episodes WHERE {where} "
                                                     "ORDER BY episode_id", params, timeout_s)]

    def episode(self, episode_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """The episode row with its calls (in seq order) and feedback, values JSON-ready."""
        found = self._json_rows("SELECT * FROM episodes WHERE episode_id = ?", [episode_id], timeout_s)
        if not found:
            raise UnknownEpisode(f"episode {episode_id!r} does not exist")
        return {
            **found[0],
            "calls": self._json_rows("SELECT * FROM calls WHERE episode_id = ? ORDER BY seq", [episode_id], timeout_s),
            "feedback": self._json_rows("SELECT * FROM feedback WHERE episode_id = ? ORDER BY created_at",
                                        [episode_id], timeout_s),
        }
