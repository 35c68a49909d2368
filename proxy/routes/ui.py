"""`GET /ui`: the live page, and `GET /v1/dashboard`, the store summaries it shows.

The page is static (`proxy/ui/`, read once at import) and holds no data, so it is served to
anyone who reaches the proxy; everything it shows comes from admin routes (`/v1/dashboard`,
`/v1/adapters`, `/v1/learner/status`), with the admin key the page asks for when keys are on.
Strict CSP and no framing: the page's only writes are the rollback buttons.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from flywheel.proxy.errors import ApiError
from flywheel.proxy.state import STATE
from flywheel.store.summaries import DASHBOARD
from flywheel.store.writer import ReadersBusy

_TYPES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
_ASSETS = {name: (Path(__file__).resolve().parent.parent / "ui" / name).read_bytes() for name in _TYPES}
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
}
_DASHBOARD_ROWS = 1000  # per panel: the page shows the latest of each


async def page(request: web.Request) -> web.Response:
    name = request.match_info.get("file", "index.html")
    if name not in _ASSETS:
        raise ApiError(404, f"no such file: /ui/{name}", "not_found")
    return web.Response(body=_ASSETS[name], content_type=_TYPES[name], charset="utf-8", headers=_HEADERS)


async def dashboard(request: web.Request) -> web.Response:
    """Reward per version (held-out and train), agents, updates and recent episodes, one JSON object."""
    state = request.app[STATE]
    config = state.config
    await state.writer.flush(timeout_s=5)
    try:
        body = await state.writer.user_query(config.sql_timeout_s, state.writer.store.summaries_json, DASHBOARD,
                                             _DASHBOARD_ROWS, config.sql_max_bytes, config.sql_timeout_s)
    except ReadersBusy as busy:
        raise ApiError(429, f"too many SQL queries running: {busy}; retry later", "sql_busy") from None
    return web.Response(body=body, content_type="application/json")
