"""Read-only SQL on the store: one SELECT, in a READ ONLY transaction that is rolled back,
interrupted after a time limit, its result capped in rows and in encoded bytes.

This module is DuckDB's sandbox, and the part both stores share: the error types, the
JSON conversion of values and the row and byte caps (`json_reply`, `collect`), so a
reply reads the same from either database (PostgreSQL's sandbox: `store/pg_sandbox.py`).

These run on reader threads (never the event loop), each on a cursor of the store's one
connection, which DuckDB allows beside the writer thread. A query is refused before it
runs unless it is one SELECT (or EXPLAIN of one) whose syntax tree calls none of the
functions that act on the database (`checkpoint()`) or run SQL given as text (`query()`);
the READ ONLY transaction then refuses any write a SELECT could still hide (`WITH d AS
(DELETE ... RETURNING *)`), so no query can conflict with the writer. Memory is capped by
the store's connection settings and the proxy's address-space limit (`flywheel.proxy.app`).
"""

from __future__ import annotations

import json
import math
import re
import threading
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Callable, Iterator, Sequence

import duckdb
import orjson

# Statement types a read-only query may have; everything else (INSERT, SET, COPY,
# ATTACH, LOAD, PRAGMA, CALL, EXPORT, ...) is refused before it runs.
_READ_ONLY_TYPES = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
# Functions refused anywhere in a query: they checkpoint the database, or run SQL from a string
# (which the syntax-tree check could not see into).
_REFUSED_FUNCTIONS = {"checkpoint", "force_checkpoint", "query", "query_table", "json_execute_serialized_sql"}
_EXPLAIN = re.compile(r"^\s*explain\s+(analy[sz]e\s+)?", re.IGNORECASE)
FETCH_ROWS = 1024  # rows fetched at a time, so a byte cap stops before everything is in memory

Run = Callable[[duckdb.DuckDBPyConnection], duckdb.DuckDBPyConnection]  # cursor -> executed cursor


class ReadOnlyViolation(ValueError):
    """The query is not one read-only statement; it was refused before it ran."""


class QueryError(ValueError):
    """The query failed, ran out of memory, or ran past its time limit."""


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise ReadOnlyViolation unless `sql` is one SELECT (or EXPLAIN of one) calling no refused function."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as bad:
        raise QueryError(str(bad)) from None
    if len(statements) != 1:
        raise ReadOnlyViolation(f"expected exactly one statement, got {len(statements)}")
    if statements[0].type not in _READ_ONLY_TYPES:
        raise ReadOnlyViolation(f"only read-only queries (SELECT) are allowed, not {statements[0].type.name}")
    select = _EXPLAIN.sub("", sql, count=1) if statements[0].type == duckdb.StatementType.EXPLAIN else sql
    cur = con.cursor()
    try:
        tree = json.loads(cur.execute("SELECT json_serialize_sql(?)", [select]).fetchone()[0])
    finally:
        cur.close()
    if tree.get("error"):
        raise ReadOnlyViolation(f"only SELECT statements (or EXPLAIN of one) are allowed: {tree.get('error_message')}")
    refused = sorted(_REFUSED_FUNCTIONS & set(_function_names(tree)))
    if refused:
        raise ReadOnlyViolation(f"{', '.join(refused)}() may not be called from a query")


def read_only_query(con: duckdb.DuckDBPyConnection, sql: str, max_rows: int, timeout_s: float) -> dict[str, Any]:
    """Run one read-only statement; returns {columns, types, rows, truncated}."""
    check_read_only(con, sql)
    return read(con, lambda cur: cur.execute(sql), max_rows, timeout_s)


def read_only_json(con: duckdb.DuckDBPyConnection, sql: str, max_rows: int, max_bytes: int,
                   timeout_s: float) -> bytes:
    """`read_only_query` encoded as the JSON reply of POST /v1/sql, on this (reader) thread."""
    check_read_only(con, sql)
    return json_reply(lambda keep: _fetch(con, lambda cur: cur.execute(sql), keep, timeout_s, jsonable=True),
                      max_rows, max_bytes)


# A query run by one of the stores, handing each row to `keep` until it refuses one (returns
# False): (columns, types, whether a row was refused). Both stores' replies are built on it.
Keep = Callable[[Any], bool]
Fetch = Callable[[Keep], tuple[list[str], list[str], bool]]


def json_reply(fetch: Fetch, max_rows: int, max_bytes: int) -> bytes:
    """POST /v1/sql's JSON reply to the rows `fetch` hands over (JSON-ready values).

    Rows stop at `max_rows` or once their encoding passes `max_bytes`; either sets "truncated";
    "row_count" says how many were sent.
    """
    encoded: list[bytes] = []
    size = 0

    def keep(row: list[Any]) -> bool:
        nonlocal size
        if len(encoded) >= max_rows:
            return False
        try:
            line = orjson.dumps(row)
        except orjson.JSONEncodeError as unencodable:
            raise QueryError(f"a value cannot be sent as JSON: {unencodable}") from None
        if size + len(line) + 1 > max_bytes:
            return False
        encoded.append(line)
        size += len(line) + 1
        return True

    columns, types, truncated = fetch(keep)
    head = orjson.dumps({"columns": columns, "types": types, "truncated": truncated, "row_count": len(encoded)})
    return head[:-1] + _ROWS + b",".join(encoded) + b"]}"


_ROWS = b',"rows":['  # its first occurrence ends json_reply's head: inside a JSON string a quote is escaped


def reply_row_count(reply: bytes) -> int:
    """The row count of a `json_reply`, read from its head alone (the rows may be megabytes)."""
    return orjson.loads(reply[:reply.index(_ROWS)] + b"}")["row_count"]


def collect(fetch: Fetch, max_rows: int) -> dict[str, Any]:
    """{columns, types, rows, truncated}: up to `max_rows` of the rows `fetch` hands over."""
    rows: list[Any] = []
    columns, types, truncated = fetch(lambda row: len(rows) < max_rows and (rows.append(row) or True))
    return {"columns": columns, "types": types, "rows": rows, "truncated": truncated}


def keep_rows(chunks: Iterator[Sequence[tuple]], types: list[str], keep: Keep, jsonable: bool) -> bool:
    """Hand `keep` the rows of `chunks` (JSON-ready if `jsonable`); True if it refused one."""
    for chunk in chunks:
        for row in chunk:
            if not keep([json_value(v, t) for v, t in zip(row, types)] if jsonable else row):
                return True
    return False


def read(con: duckdb.DuckDBPyConnection, run: Run, max_rows: int, timeout_s: float) -> dict[str, Any]:
    """Rows as JSON-ready values: {columns, types, rows, truncated}."""
    return collect(lambda keep: _fetch(con, run, keep, timeout_s, jsonable=True), max_rows)


def read_raw(con: duckdb.DuckDBPyConnection, run: Run, timeout_s: float) -> tuple[list[str], list[tuple]]:
    """Columns and every row, values as DuckDB gives them (for the store's own reads)."""
    rows: list[tuple] = []
    columns, _, _ = _fetch(con, run, lambda row: rows.append(row) or True, timeout_s)
    return columns, rows


def _fetch(con: duckdb.DuckDBPyConnection, run: Run, keep: Keep, timeout_s: float,
           jsonable: bool = False) -> tuple[list[str], list[str], bool]:
    """Run `run(cursor)` in a rolled-back READ ONLY transaction on its own cursor, interrupted
    after timeout_s, handing `keep` one row at a time (a `Fetch`)."""
    cur = con.cursor()
    timer = threading.Timer(timeout_s, cur.interrupt)
    timer.start()
    try:
        cur.execute("BEGIN TRANSACTION READ ONLY")
        result = run(cur)
        description = result.description or []
        columns, types = [d[0] for d in description], [str(d[1]) for d in description]
        return columns, types, keep_rows(fetch_chunks(result), types, keep, jsonable)
    except duckdb.InterruptException:
        raise QueryError(f"query exceeded the {timeout_s:g} s time limit") from None
    except duckdb.OutOfMemoryException:
        raise QueryError("query ran out of memory (the proxy's sql_memory_mb / memory_headroom_mb caps); "
                         "select fewer or smaller values") from None
    except duckdb.Error as bad:
        raise QueryError(str(bad)) from None
    finally:
        timer.cancel()
        try:
            cur.rollback()
        except duckdb.Error:
            pass
        cur.close()


def fetch_chunks(cursor) -> Iterator[list[tuple]]:
    """A query's rows FETCH_ROWS at a time, from a DuckDB result or a DB-API cursor (psycopg's)."""
    while chunk := cursor.fetchmany(FETCH_ROWS):
        yield chunk


def _function_names(node: Any) -> Iterator[str]:
    """Every function name in a json_serialize_sql tree (scalar, aggregate and table functions)."""
    if isinstance(node, dict):
        name = node.get("function_name")
        if isinstance(name, str):
            yield name.lower()
        for value in node.values():
            yield from _function_names(value)
    elif isinstance(node, list):
        for value in node:
            yield from _function_names(value)


def json_value(value: Any, sql_type: str) -> Any:
    if value is None:
        return None
    if sql_type == "JSON":
        return json.loads(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (list, tuple)):
        return [json_value(v, "") for v in value]
    if isinstance(value, dict):  # MAP keys may be of any type; JSON's are strings
        return {k if isinstance(k, str) else str(k): json_value(v, "") for k, v in value.items()}
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**64:
        return str(value)  # HUGEINT beyond what JSON readers hold exactly
    if isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
