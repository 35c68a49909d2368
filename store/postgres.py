"""The store on PostgreSQL, where several proxies share one database. Synchronous (psycopg 3);
`store.writer` runs it on its own threads, as it does the DuckDB store.

The interface and its semantics are `StoreBase`'s (store/base.py), shared with DuckDB's
`Store`; what differs here is what several writers need:

- **Writes**: one transaction per `apply` batch on the writer's own connection. Rows go in by
  binary COPY into a per-connection temporary table, then one INSERT ... SELECT with ON
  CONFLICT, so the database, not the writer, keeps ids unique (the spec's unique `Index`es):
  a call, feedback or episode written again (a batch retried after a commit whose
  acknowledgement was lost) lands once. Results are returned after COMMIT.
- **Seq numbers**: each batch locks the rows of every episode it touches (`SELECT ... FOR
  UPDATE`, in id order so two writers cannot deadlock) and reads each episode's next seq
  under that lock, so two proxies appending to one episode number their calls in turn; the
  unique (episode_id, seq) index refuses a collision should one ever happen.
- **Pushes**: `episodes_to_push` claims what it returns (`FOR UPDATE SKIP LOCKED`, then
  `push_claimed_by` / `push_claimed_until`), so two proxies never get the same episode; the
  claimant gets its own claims again (its retry after a failed push) and renews them, and a
  claim lapses after `claim_lease_s`, when another proxy takes the episode over.
- **Registry**: adapter rows are written under a transaction-scoped advisory lock and stamped
  with the clock after it, so `adapters_changed_at` only grows in commit order.
- **One-time work**: `try_lock` takes a session advisory lock on a connection of its own,
  held until `close` (or until this process dies and its connection with it). The store's
  own locks (migrate, registry) use the two-key form, a key space `try_lock`'s names never reach.
- **SQL route**: store/pg_sandbox.py, as the reader role (`ensure_reader_role`).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import uuid
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from typing import Any, Callable, Iterator, Sequence

import psycopg
from psycopg import sql as pgsql
from psycopg.types.string import TextLoader

from flywheel.store import StoreUnreachable, shown
from flywheel.store.base import EpisodeState, StoreBase, insert_select
from flywheel.store.pg_sandbox import check_read_only, column_types, fetcher
from flywheel.store.records import CallRecord, EpisodeClose, EpisodeOpen, EpisodeQuarantined, EpisodesPushed, \
    Feedback, GradeFailed, InfraError, StoreOp
from flywheel.store.sandbox import QueryError, collect, json_reply, json_value
from flywheel.store.schema import POSTGRES, TABLES, Table, migrate as migrate_schema

log = logging.getLogger("flywheel.store")

READER_ROLE = "flywheel_reader"
_PARAMS = re.compile(r"\?|\$([A-Za-z_][A-Za-z_0-9]*)")
_EPISODE_OPS = (EpisodeOpen, CallRecord, Feedback, EpisodeClose, InfraError, GradeFailed, EpisodeQuarantined)
# SQLSTATE classes that mean the database cannot take writes now, not that the batch holds
# something it refuses: insufficient resources (53: disk full, out of memory, too many
# connections), operator intervention (57: shutting down), connection exception (08), system
# error (58), transaction rollback (40: a deadlock). psycopg's exception classes do not nest by class.
_UNAVAILABLE_CLASSES = {"53", "57", "08", "58", "40"}


class ReaderRoleUnavailable(RuntimeError):
    """The read-only role for the SQL route does not exist and the connecting role may not create it."""


@lru_cache(maxsize=1024)
def _pg(sql: str) -> str:
    """The shared SQL's `?` and `$name` parameters as psycopg's `%s` and `%(name)s`."""
    return _PARAMS.sub(lambda m: f"%({m.group(1)})s" if m.group(1) else "%s", sql.replace("%", "%%"))


def connect(url: str, prepare: bool = True) -> psycopg.Connection:
    """An autocommit connection (transactions are explicit) in UTC, JSON columns read as text (as
    DuckDB gives them). `prepare`: let psycopg prepare repeated statements (not on connections
    that run DISCARD ALL, which drops them)."""
    con = psycopg.connect(url, autocommit=True, options="-c TimeZone=UTC", connect_timeout=10,
                          prepare_threshold=5 if prepare else None)
    for name in ("json", "jsonb"):
        con.adapters.register_loader(name, TextLoader)
    return con


def _stage(table: Table) -> str:
    """The writer's temporary table that a bulk insert into `table` is copied into first."""
    return f"_stage_{table.name}"


# Spec types staged as another type and cast on insert. JSON arrives as text, so that a value
# that is not JSON fails there, as in DuckDB. Integers arrive as bigint, since psycopg's binary
# integer dumper wraps a value past 32 bits silently, where the cast refuses it. Lists arrive as
# array literals (`_array_literal`), which the server parses ~2x faster than psycopg dumps lists.
_STAGED_AS = {"JSON": "text", "INTEGER": "bigint", "INTEGER[]": "text", "FLOAT[]": "text"}
_STAGE_CASTS = {"JSON": "jsonb", "INTEGER": "integer", "INTEGER[]": "integer[]", "FLOAT[]": "real[]"}


@lru_cache(maxsize=None)
def _stage_types(table: Table) -> list[str]:
    """The staging table's column types (`_STAGED_AS`)."""
    return [_STAGED_AS.get(c.sql_type) or POSTGRES.types[c.sql_type] for c in table.columns]


def _array_literal(values: list | None) -> str | None:
    """A list of numbers as PostgreSQL's array text: {1,2,3} ({1,NULL} for a missing element)."""
    if values is None:
        return None
    text = ",".join(map(repr, values))
    if "None" in text:  # rare: the slow way
        text = ",".join("NULL" if v is None else repr(v) for v in values)
    return "{" + text + "}"


@lru_cache(maxsize=None)
def _stage_values(table: Table) -> Callable[[dict[str, Any]], list]:
    """What a row's values are staged as, column by column."""
    lists = {c.name for c in table.columns if c.sql_type.endswith("[]")}
    return lambda row: [_array_literal(row.get(n)) if n in lists else row.get(n) for n in table.column_names]


def _rows(cur: psycopg.Cursor) -> list[tuple]:
    return cur.fetchall() if cur.description else []


class _Pool:
    """Connections for the reader threads, opened when none is idle and kept; a broken one is dropped."""

    def __init__(self, open_connection: Callable[[], psycopg.Connection]):
        self._open = open_connection
        self._idle: list[psycopg.Connection] = []
        self._lock = threading.Lock()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        with self._lock:
            con = self._idle.pop() if self._idle else None
        con = con or self._open()
        try:
            yield con
        finally:
            if con.closed or con.broken or con.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                con.close()
            else:
                with self._lock:
                    self._idle.append(con)

    def close(self) -> None:
        with self._lock:
            for con in self._idle:
                con.close()
            self._idle.clear()


def ensure_reader_role(con: psycopg.Connection, role: str) -> None:
    """Make `role` a NOLOGIN role that may SELECT Flywheel's tables and do nothing else, and let
    the connecting role `SET ROLE` to it. Creating it takes CREATEROLE; without, a DBA runs
    once: CREATE ROLE <role> NOLOGIN; GRANT <role> TO <flywheel's role>; and this grants the rest."""
    found = con.execute("SELECT rolsuper OR rolcreaterole OR rolcreatedb OR rolbypassrls OR rolcanlogin "
                        "FROM pg_roles WHERE rolname = %s", [role]).fetchone()
    may_create = con.execute("SELECT rolcreaterole FROM pg_roles WHERE rolname = current_user").fetchone()[0]
    name = pgsql.Identifier(role)
    if found is None:
        if not may_create:
            raise ReaderRoleUnavailable(
                f"role {role!r} for read-only SQL does not exist and {con.info.user!r} may not create it: "
                f"as an administrator, run CREATE ROLE {role} NOLOGIN; GRANT {role} TO {con.info.user};")
        con.execute(pgsql.SQL("CREATE ROLE {} NOLOGIN").format(name))
    elif found[0]:
        raise ReaderRoleUnavailable(f"role {role!r} can do more than read (superuser, create roles or databases, "
                                    "bypass row security, or log in): refusing to run users' SQL as it")
    if not con.execute("SELECT pg_has_role(current_user, %s, 'MEMBER')", [role]).fetchone()[0]:
        con.execute(pgsql.SQL("GRANT {} TO CURRENT_USER").format(name))
    con.execute(pgsql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
        pgsql.Identifier(con.execute("SELECT current_schema()").fetchone()[0]), name))
    con.execute(pgsql.SQL("GRANT SELECT ON {} TO {}").format(
        pgsql.SQL(", ").join(pgsql.Identifier(t.name) for t in TABLES), name))


class PostgresStore(StoreBase):
    """The PostgreSQL store (the interface and semantics: `StoreBase`; what differs: the module's doc)."""

    dialect = POSTGRES
    shared = True
    calls_conflict = "ON CONFLICT (call_id) DO NOTHING"

    def __init__(self, url: str, read_only: bool = False, claim_lease_s: float = 120.0,
                 reader_role: str = READER_ROLE):
        self.url = url
        self.claim_lease_s = claim_lease_s
        self.reader_role = reader_role
        self.claimant = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # this store's pushes
        self._con: psycopg.Connection | None = None  # the writer's (one thread)
        self._readers = _Pool(lambda: connect(url))
        self._users = _Pool(lambda: connect(url, prepare=False))  # users' SQL: reset after each query
        self._locks: psycopg.Connection | None = None  # holds `try_lock`'s locks
        self._held: set[str] = set()
        self._locks_guard = threading.Lock()
        try:  # a wrong URL is said at open, once, rather than by every later read and write
            if read_only:
                with self._readers.connection():
                    pass
            else:
                self._migrate()
        except psycopg.OperationalError as down:
            raise StoreUnreachable(f"cannot open the store {shown(url)}: {down}") from None

    def _migrate(self) -> None:
        """Upgrade the schema and set up the reader role, in one transaction under a lock, so
        proxies starting together on a new database do not trip over each other."""
        con = self._writer()
        con.execute("BEGIN")
        try:
            con.execute("SELECT pg_advisory_xact_lock(hashtext('flywheel'), hashtext('migrate'))")
            migrate_schema(lambda sql, params: _rows(con.execute(_pg(sql), params)), POSTGRES)
            ensure_reader_role(con, self.reader_role)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Hand this store's unpushed claims back (another proxy takes them at once), release its
        locks, close every connection."""
        try:
            with self._readers.connection() as con:
                con.execute("UPDATE episodes SET push_claimed_by = NULL, push_claimed_until = NULL "
                            "WHERE push_claimed_by = %s AND pushed_at IS NULL", [self.claimant])
        except psycopg.Error as failure:  # the claims lapse by themselves
            log.warning("could not release push claims at close: %s", failure)
        if self._locks is not None and not self._locks.closed:
            try:  # at once: a closed connection's backend lets go of its locks only when it has exited
                self._locks.execute("SELECT pg_advisory_unlock_all()")
            except psycopg.Error:
                pass
        for con in (self._con, self._locks):
            if con is not None:
                con.close()
        self._readers.close()
        self._users.close()

    # ---- writes (one thread) ------------------------------------------------

    def _writer(self) -> psycopg.Connection:
        """The writer's connection, opened again after it broke, with its staging tables."""
        if self._con is None or self._con.closed or self._con.broken:
            self._con = connect(self.url)
            try:  # a call's token lists are TOASTed: lz4 compresses them ~3x faster than the default pglz
                self._con.execute("SET default_toast_compression = 'lz4'")
            except psycopg.errors.InvalidParameterValue:  # a server built without lz4
                pass
            for table in TABLES:  # outside any batch: a rolled-back batch must not take them along
                self._con.execute(f"CREATE TEMPORARY TABLE {_stage(table)} "
                                  f"({', '.join(f'{c.name} {t}' for c, t in zip(table.columns, _stage_types(table)))}) "
                                  "ON COMMIT DELETE ROWS")
        return self._con

    def _begin(self) -> None:
        self._writer().execute("BEGIN")

    def _commit(self) -> None:
        status = self._con.execute("COMMIT").statusmessage
        if status != "COMMIT":  # the server rolled back a transaction that had failed
            raise RuntimeError(f"the batch's transaction ended in {status}")

    def _roll_back(self) -> None:
        if self._con is not None and not self._con.closed:
            try:
                self._con.execute("ROLLBACK")
            except psycopg.Error:  # the connection is gone: the next batch opens another
                self._con.close()

    def _is_unavailable(self, error: Exception) -> bool:
        if isinstance(error, (MemoryError, OSError, psycopg.InterfaceError)):
            return True
        if isinstance(error, psycopg.Error) and error.sqlstate:
            return error.sqlstate[:2] in _UNAVAILABLE_CLASSES
        return isinstance(error, psycopg.OperationalError)  # no SQLSTATE: the connection failed client-side

    def _execute(self, sql: str, params: Sequence | dict = ()) -> list[tuple]:
        return _rows(self._con.execute(_pg(sql), params))

    def _executemany(self, sql: str, rows: list[tuple]) -> None:
        with self._con.cursor() as cur:
            cur.executemany(_pg(sql), rows)

    def _insert_rows(self, table: Table, rows: list[dict[str, Any]], suffix: str = "") -> list[tuple]:
        """Binary COPY into the table's staging table, then one INSERT ... SELECT (`_STAGED_AS`)."""
        stage = _stage(table)
        with self._con.cursor() as cur:
            with cur.copy(f"COPY {stage} ({', '.join(table.column_names)}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(_stage_types(table))
                values = _stage_values(table)
                for row in rows:
                    copy.write_row(values(row))
            cur.execute(insert_select(table, stage, suffix, casts=_STAGE_CASTS))
            inserted = _rows(cur)
            cur.execute(f"DELETE FROM {stage}")  # a second insert into this table in the same batch starts empty
        return inserted

    def _episode_states(self, ops: Sequence[StoreOp], opened: dict[str, dict[str, Any]],
                        created: set[str]) -> dict[str, EpisodeState]:
        """Lock every episode the batch touches, then read the next seqs: another proxy's batch on
        the same episodes waits for this one's commit, and then sees its calls."""
        touched = {op.episode_id for op in ops if isinstance(op, _EPISODE_OPS)}
        touched.update(e for op in ops if isinstance(op, EpisodesPushed) for e in op.episode_ids)
        if touched:
            self._execute("SELECT episode_id FROM episodes WHERE episode_id IN (SELECT unnest(?::VARCHAR[])) "
                          "ORDER BY episode_id FOR UPDATE", [sorted(touched)])
        return self._load_episode_states(list(opened))

    def _change_time(self) -> datetime:
        """After the registry's write lock (held to commit), so a later commit always has a later time."""
        self._execute("SELECT pg_advisory_xact_lock(hashtext('flywheel'), hashtext('adapters'))")
        return self._execute("SELECT clock_timestamp()")[0][0]

    # ---- reads (any thread, a pooled connection each) -----------------------

    @contextmanager
    def _transaction(self, con: psycopg.Connection, timeout_s: float, read_only: bool = True) -> Iterator[None]:
        """A transaction on `con` bounded by `timeout_s`, committed if it is not read-only; errors as QueryError."""
        try:
            con.execute("BEGIN READ ONLY" if read_only else "BEGIN")
            con.execute(pgsql.SQL("SET LOCAL statement_timeout = {}").format(pgsql.Literal(max(1, int(timeout_s * 1000)))))
            yield
            con.execute("ROLLBACK" if read_only else "COMMIT")
        except psycopg.errors.QueryCanceled:
            raise QueryError(f"query exceeded the {timeout_s:g} s time limit") from None
        except psycopg.Error as bad:
            raise QueryError(str(bad).strip()) from None
        finally:
            if not con.closed and con.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                try:
                    con.execute("ROLLBACK")
                except psycopg.Error:
                    con.close()

    def _read(self, sql: str, params: Sequence | dict, timeout_s: float,
              read_only: bool = True) -> tuple[list[psycopg.Column], list[tuple]]:
        with self._readers.connection() as con, self._transaction(con, timeout_s, read_only):
            cur = con.execute(_pg(sql), params)
            return list(cur.description or []), _rows(cur)

    def _dicts(self, sql: str, params: Sequence | dict, timeout_s: float = 60) -> list[dict[str, Any]]:
        description, rows = self._read(sql, params, timeout_s)
        return [dict(zip([d.name for d in description], row)) for row in rows]

    def _json_rows(self, sql: str, params: Sequence, timeout_s: float) -> list[dict[str, Any]]:
        description, rows = self._read(sql, params, timeout_s)
        names, types = [d.name for d in description], column_types(description)
        return [{n: json_value(v, t) for n, v, t in zip(names, row, types)} for row in rows]

    def query(self, sql: str, max_rows: int, timeout_s: float) -> dict[str, Any]:
        """One read-only statement (store/pg_sandbox.py): {columns, types, rows, truncated}."""
        explain = check_read_only(sql)
        with self._users.connection() as con:
            return collect(fetcher(con, sql, timeout_s, self.reader_role, explain), max_rows)

    def query_json(self, sql: str, max_rows: int, max_bytes: int, timeout_s: float) -> bytes:
        """The same, encoded as POST /v1/sql's JSON reply, capped at `max_bytes` of rows."""
        explain = check_read_only(sql)
        with self._users.connection() as con:
            return json_reply(fetcher(con, sql, timeout_s, self.reader_role, explain), max_rows, max_bytes)

    def episodes_to_push(self, limit: int, quiet_s: float, await_grade: tuple[str, str, bool] | None = None,
                         busy: Sequence[str] = ()) -> list[dict[str, Any]]:
        """`StoreBase.episodes_to_push`'s episodes, claimed for this store until `claim_lease_s`
        from now: no other store gets them until their claim lapses or they are pushed
        (EpisodesPushed) or quarantined. Its own claims come back to it (and are renewed), so
        after a failed push the next call retries them."""
        where, params = self._push_filter(quiet_s, await_grade, busy)
        description, rows = self._read(
            f"WITH picked AS (SELECT e.episode_id FROM episodes e WHERE {where} "
            "  AND (e.push_claimed_until IS NULL OR e.push_claimed_until < now() OR e.push_claimed_by = $claimant) "
            "  ORDER BY e.created_at, e.episode_id LIMIT $limit FOR UPDATE OF e SKIP LOCKED) "
            "UPDATE episodes u SET push_claimed_by = $claimant, "
            "  push_claimed_until = now() + $lease_s * INTERVAL '1 second' "
            "FROM picked WHERE u.episode_id = picked.episode_id RETURNING u.*",
            {**params, "limit": limit, "claimant": self.claimant, "lease_s": self.claim_lease_s}, 60, read_only=False)
        names = [d.name for d in description]
        claimed = sorted((dict(zip(names, row)) for row in rows), key=lambda e: (e["created_at"], e["episode_id"]))  # RETURNING: no order
        return self._with_calls_and_feedback(claimed)

    def try_lock(self, name: str) -> bool:
        """Take the session advisory lock `name` (held until `close`, or until this process's
        connection goes); False if another store holds it, or the database cannot be reached."""
        with self._locks_guard:
            if name in self._held:
                return True
            try:
                if self._locks is None or self._locks.closed or self._locks.broken:
                    self._locks, self._held = connect(self.url), set()
                got = self._locks.execute("SELECT pg_try_advisory_lock(hashtext(%s))", [name]).fetchone()[0]
            except psycopg.OperationalError as failure:
                log.warning("cannot take lock %r: %s", name, failure)
                return False
            if got:
                self._held.add(name)
            return got
