"""Read-only SQL on the store: one statement, on its own cursor, in a transaction that is rolled
back, interrupted after a time limit, with a row cap. Values come back JSON-ready.

These run on reader threads (never the event loop), each on a cursor of the store's one
connection, which DuckDB allows beside the writer thread.
"""

from __future__ import annotations

import json
import math
import threading
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Callable

import duckdb

# Statement types a read-only query may have; everything else (INSERT, SET, COPY,
# ATTACH, LOAD, PRAGMA, CALL, EXPORT, ...) is refused before it runs.
_READ_ONLY_TYPES = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}

Run = Callable[[duckdb.DuckDBPyConnection], duckdb.DuckDBPyConnection]  # cursor -> executed cursor


class ReadOnlyViolation(ValueError):
    """The query is not one read-only statement; it was refused before it ran."""


class QueryError(ValueError):
    """The query failed, or ran past its time limit."""


def read_only_query(con: duckdb.DuckDBPyConnection, sql: str, max_rows: int, timeout_s: float) -> dict[str, Any]:
    """Run one read-only statement; returns {columns, types, rows, truncated}.

    Refuses anything but SELECT/EXPLAIN, and runs it in a transaction that is
    rolled back, so even a function with side effects leaves nothing behind.
    """
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as bad:
        raise QueryError(str(bad)) from None
    if len(statements) != 1:
        raise ReadOnlyViolation(f"expected exactly one statement, got {len(statements)}")
    if statements[0].type not in _READ_ONLY_TYPES:
        raise ReadOnlyViolation(f"only read-only queries (SELECT) are allowed, not {statements[0].type.name}")
    return read(con, lambda cur: cur.execute(sql), max_rows, timeout_s)


def read(con: duckdb.DuckDBPyConnection, run: Run, max_rows: int, timeout_s: float) -> dict[str, Any]:
    """Rows as JSON-ready values: {columns, types, rows, truncated}."""
    columns, types, rows, truncated = read_raw(con, run, max_rows, timeout_s)
    return {
        "columns": columns,
        "types": types,
        "rows": [[_jsonable(v, t) for v, t in zip(row, types)] for row in rows],
        "truncated": truncated,
    }


def read_raw(con: duckdb.DuckDBPyConnection, run: Run, max_rows: int,
             timeout_s: float) -> tuple[list[str], list[str], list[tuple], bool]:
    """Run `run(cursor)` in a rolled-back transaction on its own cursor, interrupted after timeout_s."""
    cur = con.cursor()
    timer = threading.Timer(timeout_s, cur.interrupt)
    timer.start()
    try:
        cur.begin()
        result = run(cur)
        rows = result.fetchmany(max_rows + 1)
        description = result.description or []
    except duckdb.InterruptException:
        raise QueryError(f"query exceeded the {timeout_s:g} s time limit") from None
    except duckdb.Error as bad:
        raise QueryError(str(bad)) from None
    finally:
        timer.cancel()
        try:
            cur.rollback()
        except duckdb.Error:
            pass
        cur.close()
    return [d[0] for d in description], [str(d[1]) for d in description], rows[:max_rows], len(rows) > max_rows


def _jsonable(value: Any, sql_type: str) -> Any:
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
        return [_jsonable(v, "") for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v, "") for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
