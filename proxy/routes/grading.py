"""`/v1/grader`: the grading service's state, and re-grading stored episodes (`flywheel grade`)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime

from aiohttp import web

from flywheel.proxy.errors import ApiError, read_json_object
from flywheel.proxy.grader import Grader
from flywheel.proxy.state import STATE
from flywheel.store.summaries import clock

_FAILED = f"""
SELECT episode_id, task_id, {clock('grade_failed_at', date=True)} AS failed_at, grade_error
FROM episodes WHERE grade_failed_at IS NOT NULL ORDER BY grade_failed_at DESC LIMIT 20
"""  # SQL both stores run (store/summaries.py)


def _grader(request: web.Request) -> Grader:
    grader = request.app[STATE].grader
    if grader is None:
        raise ApiError(503, "no grader configured: set [grader] kind = \"endpoint\" and its url", "no_grader")
    return grader


async def status(request: web.Request) -> web.Response:
    """Counts since start, and the latest episodes the grader gave up on (from the store)."""
    grader = _grader(request)
    writer = request.app[STATE].writer
    failed = await writer.read(writer.store.query, _FAILED, 20, 10)
    shadows = request.app[STATE].shadows
    return web.json_response({**grader.health(), **({"shadows": shadows.health()} if shadows else {}),
                              "grade_failed": [dict(zip(failed["columns"], row)) for row in failed["rows"]]})


async def regrade(request: web.Request) -> web.Response:
    """`{"since": ISO time?, "grader_version": V?}`: every closed episode since then scored
    under V (the configured version by default), failed ones tried again; answers when done."""
    grader = _grader(request)
    body = await read_json_object(request)
    version = body.get("grader_version") or grader.config.version
    if not isinstance(version, str):
        raise ApiError(400, "'grader_version' must be a string", "invalid_field")
    since = body.get("since")
    try:
        since = datetime.fromisoformat(since) if since is not None else None
    except (TypeError, ValueError):
        raise ApiError(400, f"'since' must be an ISO time, got {since!r}", "invalid_field") from None
    if since is not None and since.tzinfo is None:
        raise ApiError(400, "'since' needs a time zone offset (e.g. 2026-12-01T00:00Z)", "invalid_field")
    request.app[STATE].require_writable_store()
    counts = await grader.regrade(version, since)
    return web.json_response({"grader_version": version, **asdict(counts)})


async def calibrate(request: web.Request) -> web.Response:
    """`{"labels": [{"episode_id", "label"}, ...]}`: the grader's agreement with these human labels
    on the stored episodes, within task groups (nothing is recorded); groups it cannot score are
    left out and counted."""
    grader = _grader(request)
    body = await read_json_object(request)
    rows = body.get("labels")
    if not isinstance(rows, list) or not all(
            isinstance(r, dict) and isinstance(r.get("episode_id"), str) and isinstance(r.get("label"), (int, float))
            and not isinstance(r.get("label"), bool) for r in rows):
        raise ApiError(400, "'labels' must be a list of {\"episode_id\": str, \"label\": number}", "invalid_field")
    found, unscored = await grader.calibrate({r["episode_id"]: float(r["label"]) for r in rows})
    return web.json_response({**asdict(found), "unscored_episodes": unscored,
                              "last_error": grader.counts.last_error if unscored else ""})
