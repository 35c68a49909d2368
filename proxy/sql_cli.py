"""`flywheel sql`: a read-only query through a running proxy, or on a file no process holds."""

from __future__ import annotations

import csv
import json
import sys
import urllib.error
import urllib.request
from typing import Callable

from store.db import QueryError, ReadOnlyViolation, Store

DEFAULT_URL = "http://127.0.0.1:8400"
_TABLE_CELL = 60  # widest cell in table format; use --format csv/json for whole values


def proxy_request(url: str, path: str, body: dict | None = None, timeout_s: float = 120, hint: str = ""):
    """An open response from the proxy (POST with `body`, else GET); an error reply or no proxy
    ends the command with the proxy's message."""
    request = urllib.request.Request(url.rstrip("/") + path, headers={"Content-Type": "application/json"},
                                     data=json.dumps(body).encode() if body is not None else None)
    try:
        return urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as refused:
        raise SystemExit(f"flywheel: {json.load(refused).get('error', {}).get('message', refused.reason)}") from None
    except urllib.error.URLError as down:
        raise SystemExit(f"flywheel: no proxy at {url} ({down.reason}){hint}") from None


def fetch_via_proxy(query: str, url: str) -> dict:
    with proxy_request(url, "/v1/sql", {"query": query}, hint="; pass --db FILE for a file") as response:
        return json.load(response)


def fetch_from_file(query: str, db: str, max_rows: int = 1_000_000) -> dict:
    try:
        store = Store(db, read_only=True)
    except Exception as busy:  # duckdb raises IOException when another process holds the file
        raise SystemExit(f"flywheel sql: cannot open {db}: {busy}; if a proxy holds it, use --url") from None
    try:
        return store.query(query, max_rows, timeout_s=600)
    except (ReadOnlyViolation, QueryError) as refused:
        raise SystemExit(f"flywheel sql: {refused}") from None
    finally:
        store.close()


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


def run_sql(query: str, url: str | None, db: str | None, fmt: str) -> int:
    render(fetcher(url, db)(query), fmt)
    return 0
