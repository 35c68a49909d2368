"""`POST /v1/sql`: one read-only query on the live store (the only way other processes read it)."""

from __future__ import annotations

from aiohttp import web

from flywheel.proxy.errors import ApiError, read_json_object
from flywheel.proxy.state import STATE
from flywheel.store.sandbox import QueryError, ReadOnlyViolation


async def run_sql(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json_object(request)
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ApiError(400, "'query' must be a non-empty SQL string", "invalid_query")
    max_rows = body.get("max_rows", state.config.sql_max_rows)
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0:
        raise ApiError(400, "'max_rows' must be a non-negative integer", "invalid_field")
    await state.writer.flush()
    try:
        result = await state.writer.read(
            state.writer.store.query, query, min(max_rows, state.config.sql_max_rows),
            state.config.sql_timeout_s,
        )
    except ReadOnlyViolation as refused:
        raise ApiError(400, f"refused: {refused}", "read_only") from None
    except QueryError as bad:
        raise ApiError(400, f"query failed: {bad}", "query_error") from None
    return web.json_response(result)
