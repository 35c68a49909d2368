"""`flywheel sql`: a read-only query through a running proxy, or on a file no process holds."""

from __future__ import annotations

import csv
import json
import sys
import urllib.error
import urllib.request

from store.db import QueryError, ReadOnlyViolation, Store

DEFAULT_URL = "http://127.0.0.1:8400"
_TABLE_CELL = 60  # widest cell in table format; use --format csv/json for whole values


def fetch_via_proxy(query: str, url: str) -> dict:
    request = urllib.request.Request(
        url.rstrip("/") + "/v1/sql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)
    except urllib.error.HTTPError as refused:
        message = json.load(refused).get("error", {}).get("message", refused.reason)
        raise SystemExit(f"flywheel sql: {message}") from None
    except urllib.error.URLError as down:
        raise SystemExit(f"flywheel sql: no proxy at {url} ({down.reason}); pass --db FILE for a file") from None


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


def run_sql(query: str, url: str | None, db: str | None, fmt: str) -> int:
    result = fetch_from_file(query, db) if db else fetch_via_proxy(query, url or DEFAULT_URL)
    render(result, fmt)
    return 0
