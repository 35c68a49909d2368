"""`flywheel sql`: a read-only query through a running proxy, or on a file no process holds."""

from __future__ import annotations

import csv
import json
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import duckdb

from flywheel.client import DEFAULT_URL, fetch_via_proxy
from flywheel.store import open_store

_TABLE_CELL = 60  # widest cell in table format; use --format csv/json for whole values


class StoreBusy(RuntimeError):
    """The store file cannot be opened read-only (another process holds it, or it is not there)."""


@contextmanager
def file_fetcher(db: str, max_rows: int = 1_000_000) -> Iterator[Callable[[str], dict]]:
    """query -> result on a store file opened read-only once for the whole block; raises StoreBusy,
    and each query the store's QueryError/ReadOnlyViolation."""
    try:
        store = open_store(db, read_only=True)
    except duckdb.Error as busy:  # IOException when another process holds the file
        raise StoreBusy(f"cannot open {db}: {busy}; if a proxy holds it, use --url") from None
    try:
        yield lambda query: store.query(query, max_rows, timeout_s=600)
    finally:
        store.close()


def fetch_from_file(query: str, db: str, max_rows: int = 1_000_000) -> dict:
    """One read-only query on a store file; raises StoreBusy, or the store's QueryError/ReadOnlyViolation."""
    with file_fetcher(db, max_rows) as fetch:
        return fetch(query)


def render(result: dict, fmt: str, out=sys.stdout) -> None:
    columns, rows = result["columns"], result["rows"]
    if fmt == "json":
        json.dump([dict(zip(columns, row)) for row in rows], out, indent=1)
        out.write("\n")
        return
    cells = [[_cell(v) for v in row] for row in rows]
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows(cells)
        return
    cells = [[c if len(c) <= _TABLE_CELL else c[: _TABLE_CELL - 1] + "…" for c in row] for row in cells]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda values: " | ".join(v.ljust(w) for v, w in zip(values, widths))  # noqa: E731
    out.write(line(columns) + "\n" + "-+-".join("-" * w for w in widths) + "\n")
    for row in cells:
        out.write(line(row) + "\n")
    out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''}{', truncated' if result.get('truncated') else ''})\n")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def fetcher(url: str | None, db: str | None) -> Callable[[str], dict]:
    """query -> result, on the file `db` if given, else through the proxy at `url` (default DEFAULT_URL)."""
    if db:
        return lambda query: fetch_from_file(query, db)
    return lambda query: fetch_via_proxy(query, url or DEFAULT_URL)


@contextmanager
def open_fetcher(url: str | None, db: str | None) -> Iterator[Callable[[str], dict]]:
    """As `fetcher`, for many queries in a row: the file `db` stays open until the block ends."""
    if db:
        with file_fetcher(db) as fetch:
            yield fetch
    else:
        yield fetcher(url, None)


def run_sql(query: str, url: str | None, db: str | None, fmt: str) -> int:
    render(fetcher(url, db)(query), fmt)
    return 0
