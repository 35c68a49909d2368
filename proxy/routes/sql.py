"""`POST /v1/sql`: one read-only query on the live store (the only way other processes read it).

The query runs and its reply is encoded on a SQL thread of its own (`BatchWriter.user_query`),
capped in rows and bytes; the event loop only sends the bytes.
"""

from __future__ import annotations

from aiohttp import web

from flywheel.proxy.audit import audit
from flywheel.proxy.errors import ApiError, read_json_object
from flywheel.proxy.state import STATE
from flywheel.store.sandbox import QueryError, ReadOnlyViolation, reply_row_count
from flywheel.store.writer import ReadersBusy


async def run_sql(request: web.Request) -> web.Response:
    state = request.app[STATE]
    config = state.config
    body = await read_json_object(request)
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ApiError(400, "'query' must be a non-empty SQL string", "invalid_query")
    max_rows = body.get("max_rows", config.sql_max_rows)
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0:
        raise ApiError(400, "'max_rows' must be a non-negative integer", "invalid_field")
    await state.writer.flush(timeout_s=5)  # what is queued becomes visible; a failing store is not waited out
    try:
        reply = await state.writer.user_query(config.sql_timeout_s, state.writer.store.query_json, query,
                                              min(max_rows, config.sql_max_rows), config.sql_max_bytes,
                                              config.sql_timeout_s)
    except ReadOnlyViolation as refused:
        state.metrics.sql_refused.labels("read_only").inc()
        raise ApiError(400, f"refused: {refused}", "read_only") from None
    except QueryError as bad:
        state.metrics.sql_refused.labels("query_error").inc()
        raise ApiError(400, f"query failed: {bad}", "query_error") from None
    except ReadersBusy as busy:
        state.metrics.sql_refused.labels("busy").inc()
        raise ApiError(429, f"too many SQL queries running: {busy}; retry later", "sql_busy") from None
    await audit(request, "sql", row_count=reply_row_count(reply), detail={"query": query})
    return web.Response(body=reply, content_type="application/json")
