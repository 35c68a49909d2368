"""Read-only SQL on a PostgreSQL store: the same refusals, limits, errors and JSON as DuckDB's
sandbox (store/sandbox.py), enforced by the server.

A query runs on a connection of its own (never the writer's) in a READ ONLY transaction
that is rolled back, under `SET LOCAL ROLE` to the reader role (SELECT on Flywheel's tables
and nothing else: `postgres.ensure_reader_role`) and `SET LOCAL statement_timeout`, with a
client-side cancel at the same limit for the whole fetch. Rows come through a server-side
cursor in chunks, so a row or byte cap stops before the whole result is in memory.

Before it runs, a cheap lexical check gives the same refusals as DuckDB's syntax-tree check
(one statement; SELECT, WITH, VALUES, TABLE or EXPLAIN of one), and refuses the functions
that act beyond the query (settings and roles, other sessions, locks, files, large objects)
or run SQL given as text. It is a first line only: the server refuses every write anyway
(`WITH d AS (DELETE ...)`: a QueryError), and the reader role cannot read files. After each
query the session is reset (DISCARD ALL), so nothing a query changed outlives it.
"""

from __future__ import annotations

import re
import threading
from typing import Iterator

import psycopg
from psycopg import sql as pgsql

from flywheel.store.sandbox import Fetch, Keep, QueryError, ReadOnlyViolation, fetch_chunks, keep_rows
from flywheel.store.schema import DUCKDB, POSTGRES

_TOKENS = re.compile(r"""
    (?P<skip>\s+|--[^\n]*|/\*.*?\*/)
  | (?P<string>[Ee]'(?:[^'\\]|\\.|'')*'|[BbXxNn]?'(?:[^']|'')*'|\$(?P<tag>[A-Za-z_][A-Za-z_0-9]*)?\$.*?\$(?P=tag)\$)
  | (?P<quoted>"(?:[^"]|"")*")
  | (?P<word>[A-Za-z_][A-Za-z_0-9$]*)
  | (?P<other>.)
""", re.VERBOSE | re.DOTALL)
_READ_ONLY_STARTS = {"select", "with", "values", "table"}
_STATEMENT_WORDS = _READ_ONLY_STARTS | {"insert", "update", "delete", "merge", "create", "declare", "execute"}
# Functions refused anywhere in a query: they change settings or the role (set_config), act on
# other sessions, take locks that outlive the query, touch server files or large objects, notify,
# or run SQL given as text (which the lexical check could not see into).
_REFUSED_FUNCTIONS = {
    "set_config", "pg_cancel_backend", "pg_terminate_backend", "pg_reload_conf", "pg_rotate_logfile",
    "pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared",
    "pg_advisory_xact_lock", "pg_advisory_xact_lock_shared", "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared", "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file",
    "lo_import", "lo_export", "lo_create", "lo_creat", "lo_unlink", "lo_put", "lo_from_bytea", "pg_notify",
    "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema", "ts_stat", "dblink", "dblink_exec",
    "pg_logical_emit_message", "pg_switch_wal", "pg_create_restore_point",
}


def _short_name(pg_type: str) -> str:
    """psycopg's name of a type (`Column.type_display`): int4 for integer, int4[] for integer[]."""
    info = psycopg.postgres.types[pg_type]
    return f"{info.name}[]" if pg_type.endswith("[]") else info.name


# how a result column's type reads in a reply: as DuckDB names the spec's type in a result
_TYPE_NAMES = {_short_name(pg): DUCKDB.types[duck] for duck, pg in POSTGRES.types.items()} | {"json": "JSON"}
_TYPE_NAMES["timestamptz"] = "TIMESTAMP WITH TIME ZONE"


def _tokens(sql: str) -> Iterator[tuple[str, str]]:
    """(kind, text) of each token: words lower-cased, quoted identifiers unquoted; no space or comments."""
    for match in _TOKENS.finditer(sql):
        kind = match.lastgroup if match.lastgroup != "tag" else "string"
        if kind == "skip":
            continue
        text = match.group(kind)
        if kind == "word":
            text = text.lower()
        elif kind == "quoted":
            kind, text = "word", text[1:-1].replace('""', '"')
        yield kind, text


def check_read_only(sql: str) -> bool:
    """Raise ReadOnlyViolation unless `sql` is one read-only statement calling no refused
    function; returns whether it is an EXPLAIN (which cannot run through a cursor)."""
    statements: list[list[tuple[str, str]]] = [[]]
    for token in _tokens(sql):
        if token == ("other", ";"):
            statements.append([])
        else:
            statements[-1].append(token)
    statements = [s for s in statements if s]
    if len(statements) != 1:
        raise ReadOnlyViolation(f"expected exactly one statement, got {len(statements)}")
    [tokens] = statements
    words = [text for kind, text in tokens if kind == "word"]
    first = words[0] if words else ""
    explain = first == "explain"
    if explain:
        first = next((w for w in words[1:] if w in _STATEMENT_WORDS), "")
    if first not in _READ_ONLY_STARTS:
        raise ReadOnlyViolation(f"only read-only queries (SELECT) are allowed, not {first.upper() or sql[:20]!r}")
    called = {text for (kind, text), after in zip(tokens, tokens[1:]) if kind == "word" and after == ("other", "(")}
    refused = sorted(called & _REFUSED_FUNCTIONS)
    if refused:
        raise ReadOnlyViolation(f"{', '.join(refused)}() may not be called from a query")
    return explain


def fetcher(con: psycopg.Connection, sql: str, timeout_s: float, reader_role: str, explain: bool = False) -> Fetch:
    """A `Fetch` (store/sandbox.py) of JSON-ready rows, running `sql` on `con` (autocommit, used
    by this thread only) in a rolled-back READ ONLY transaction, as `reader_role`, within `timeout_s`."""

    def fetch(keep: Keep) -> tuple[list[str], list[str], bool]:
        cancel_sent = threading.Event()

        def cancel() -> None:
            cancel_sent.set()
            con.cancel_safe()

        timer = threading.Timer(timeout_s, cancel)
        timer.start()
        try:
            con.execute("BEGIN READ ONLY")
            con.execute(pgsql.SQL("SET LOCAL ROLE {}").format(pgsql.Identifier(reader_role)))
            con.execute(pgsql.SQL("SET LOCAL statement_timeout = {}").format(pgsql.Literal(max(1, int(timeout_s * 1000)))))
            # EXPLAIN cannot be declared as a cursor; a plan is small
            with con.cursor() if explain else con.cursor(name="flywheel_sql") as cur:
                cur.execute(sql)
                description = cur.description or []
                columns = [d.name for d in description]
                types = column_types(description)
                return columns, types, keep_rows(fetch_chunks(cur), types, keep, jsonable=True)
        except psycopg.errors.QueryCanceled:
            raise QueryError(f"query exceeded the {timeout_s:g} s time limit") from None
        except psycopg.errors.OutOfMemory:
            raise QueryError("query ran out of memory; select fewer or smaller values") from None
        except psycopg.Error as bad:
            raise QueryError(str(bad).strip()) from None
        finally:
            timer.cancel()
            timer.join()
            if cancel_sent.is_set():
                # the server acts on a cancel request when it arrives, which may be during the
                # next query on this connection: the connection is not given to another one
                con.close()
            _reset(con)

    return fetch


def column_types(description: list[psycopg.Column]) -> list[str]:
    """Each result column's type as a reply names it (the spec's DuckDB names where they map)."""
    return [_TYPE_NAMES.get(d.type_display, d.type_display.upper()) for d in description]


def _reset(con: psycopg.Connection) -> None:
    """End the query's transaction and whatever it left in the session."""
    if con.closed:
        return
    try:
        con.execute("ROLLBACK")
        con.execute("DISCARD ALL")
    except psycopg.Error:  # a broken connection: the pool drops it
        con.close()
