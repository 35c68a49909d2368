"""Synchronous access to the DuckDB file. Not for the event loop: `store.writer` runs it
on its own threads.

One `Store` owns the file's only read-write connection. Writes happen on one thread
(`apply`), reads on cursors of the same connection (`query`, `episode`), which DuckDB
allows from other threads. External file access is disabled for the whole database,
so no query can read or write files beside the store.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

import duckdb
import pyarrow as pa

from flywheel.store.base import EpisodeState, StoreBase, insert_select
from flywheel.store.records import StoreOp
from flywheel.store.sandbox import read, read_only_json, read_only_query, read_raw
from flywheel.store.schema import DUCKDB, Table, migrate as migrate_schema

# A write that failed for want of memory or disk space, not for what it holds.
_RESOURCE_ERRORS = (MemoryError, OSError, duckdb.OutOfMemoryException, duckdb.IOException, pa.ArrowMemoryError)


def _is_resource_error(error: Exception) -> bool:
    text = str(error)
    return "No space left" in text or "Out of Memory" in text or "bad allocation" in text


_EPISODE_CACHE = 100_000  # episodes whose next seq the writer remembers (LRU)


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


class Store(StoreBase):
    """The DuckDB store (the interface and semantics: `StoreBase`)."""

    dialect = DUCKDB

    def __init__(self, path: str, read_only: bool = False, limits: StoreLimits = StoreLimits()):
        self.path = path
        self.con = connect(path, read_only=read_only, limits=limits)
        # the only writer knows each episode's next seq; it reads it back only for episodes it has
        # not seen since it started (or forgot)
        self._episodes: OrderedDict[str, EpisodeState] = OrderedDict()  # writer thread only
        if not read_only:
            migrate(self.con)

    def close(self) -> None:
        self.con.close()

    # ---- writes (one thread) ------------------------------------------------

    def _begin(self) -> None:
        self.con.begin()

    def _commit(self) -> None:
        self.con.commit()

    def _roll_back(self) -> None:
        self._episodes.clear()  # it may hold seqs the rollback undid
        try:
            self.con.rollback()
        except duckdb.Error:  # no transaction open (begin itself failed), or the connection is gone
            pass

    def _is_unavailable(self, error: Exception) -> bool:
        return isinstance(error, _RESOURCE_ERRORS) or _is_resource_error(error)

    def _execute(self, sql: str, params: Sequence | dict = ()) -> list[tuple]:
        return _rows(self.con.execute(sql, params))

    def _executemany(self, sql: str, rows: list[tuple]) -> None:
        self.con.executemany(sql, rows)

    def _episode_states(self, ops: Sequence[StoreOp], opened: dict[str, dict[str, Any]],
                        created: set[str]) -> dict[str, EpisodeState]:
        for episode_id in created:
            self._episodes[episode_id] = EpisodeState(next_seq=0, has_task=opened[episode_id]["task_id"] is not None)
        self._episodes.update(self._load_episode_states([e for e in opened if e not in self._episodes]))
        for episode_id in opened:
            self._episodes.move_to_end(episode_id)
        states = {e: self._episodes[e] for e in opened}
        while len(self._episodes) > _EPISODE_CACHE:
            self._episodes.popitem(last=False)
        return states

    def _change_time(self) -> datetime:
        return datetime.now(timezone.utc)  # one writer: its clock orders its writes

    def _insert_rows(self, table: Table, rows: list[dict[str, Any]], suffix: str = "") -> list[tuple]:
        """Bulk insert through Arrow: ~20x faster than executemany for list columns."""
        self.con.register("_new_rows", pa.Table.from_pylist(rows, schema=table.arrow_schema()))
        try:
            return self._execute(insert_select(table, "_new_rows", suffix))
        finally:
            self.con.unregister("_new_rows")

    # ---- reads (any thread, own cursor: store/sandbox.py) -------------------

    def query(self, sql: str, max_rows: int, timeout_s: float) -> dict[str, Any]:
        """One read-only statement (`sandbox.read_only_query`): {columns, types, rows, truncated}."""
        return read_only_query(self.con, sql, max_rows, timeout_s)

    def query_json(self, sql: str, max_rows: int, max_bytes: int, timeout_s: float) -> bytes:
        """The same, encoded as POST /v1/sql's JSON reply, capped at `max_bytes` of rows."""
        return read_only_json(self.con, sql, max_rows, max_bytes, timeout_s)

    def _dicts(self, sql: str, params: Sequence | dict, timeout_s: float = 60) -> list[dict[str, Any]]:
        columns, rows = read_raw(self.con, lambda cur: cur.execute(sql, params), timeout_s)
        return [dict(zip(columns, row)) for row in rows]

    def _json_rows(self, sql: str, params: Sequence, timeout_s: float) -> list[dict[str, Any]]:
        out = read(self.con, lambda cur: cur.execute(sql, params), 100_000, timeout_s)
        return [dict(zip(out["columns"], row)) for row in out["rows"]]


def _rows(result: duckdb.DuckDBPyConnection) -> list[tuple]:
    return result.fetchall() if result.description else []


def migrate(con: duckdb.DuckDBPyConnection) -> None:
    """Create missing tables and columns, then record SCHEMA_VERSION. Refuses a newer file."""
    migrate_schema(lambda sql, params: _rows(con.execute(sql, params)), DUCKDB)
