"""`/v1/episodes`: create an episode, post its feedback, close it, read it back."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

from aiohttp import web

from flywheel.proxy.attribution import checked_name, new_id
from flywheel.proxy.auth import GRANT, Access
from flywheel.proxy.errors import ApiError, read_json_object
from flywheel.proxy.state import STATE
from flywheel.store.schema import EVAL_TRUE
from flywheel.store.records import EpisodeClose, EpisodeOpen, Feedback, InfraError, UnknownCall, UnknownEpisode


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _optional_str(body: dict, key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"'{key}' must be a string", "invalid_field")
    return value


def _optional_name(body: dict, key: str) -> str | None:
    value = _optional_str(body, key)
    return None if value is None else checked_name(key, value)


async def _commit(request: web.Request, op):
    """Submit `op` and wait for its commit (its Idempotency-Key makes a retry after a 503 safe)."""
    state = request.app[STATE]
    state.require_writable_store()
    return await state.writer.submit(op)


def _finite_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{name}' must be a number, got {json.dumps(value)}", "invalid_reward")
    if not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be finite", "invalid_reward")
    return float(value)


async def create_episode(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ApiError(400, "'metadata' must be an object", "invalid_field")
    op = EpisodeOpen(
        episode_id=new_id("ep"),
        created_at=_now(),
        task_id=_optional_name(body, "task"),
        agent=_optional_name(body, "agent"),
        metadata=json.dumps(metadata) if metadata is not None else None,
    )
    await _commit(request, op)
    grant = request.get(GRANT)
    if metadata is not None and str(metadata.get("eval")).lower() in EVAL_TRUE and (
            grant is None or grant.access is Access.ADMIN):  # held out by the team: outside every quota
        request.app[STATE].quotas.exempt.add(op.episode_id)
    return web.json_response({"episode_id": op.episode_id, "task_id": op.task_id}, status=201)


async def post_feedback(request: web.Request) -> web.Response:
    """A reward for the episode (or one call), and/or `"infra_error": true`: the episode failed
    for reasons outside the model (a tool down, a crash), so it is never trained on."""
    body = await read_json_object(request)
    infra_error = body.get("infra_error", False)
    if not isinstance(infra_error, bool):
        raise ApiError(400, "'infra_error' must be true or false", "invalid_field")
    if infra_error:
        episode_id = request.match_info["episode"]
        source = _optional_str(body, "source")
        reason = f"reported by the client ({source})" if source else "reported by the client"
        try:
            await _commit(request, InfraError(episode_id, reason))
        except UnknownEpisode as missing:
            raise ApiError(404, str(missing), "not_found") from None
        if "reward" not in body:
            return web.json_response({"feedback_id": None, "episode_id": episode_id, "duplicate": False,
                                      "episode_reward": None, "infra_error": True})
    if "reward" not in body:
        raise ApiError(400, "'reward' is required (or \"infra_error\": true)", "invalid_reward")
    reward = _finite_number(body["reward"], "reward")
    dims = body.get("dims")
    if dims is not None:
        if not isinstance(dims, dict):
            raise ApiError(400, "'dims' must be an object {name: number}", "invalid_field")
        dims = {str(k): _finite_number(v, f"dims.{k}") for k, v in dims.items()}
    op = Feedback(
        feedback_id=new_id("fb"),
        episode_id=request.match_info["episode"],
        reward=reward,
        created_at=_now(),
        call_id=_optional_str(body, "call_id"),
        dims=json.dumps(dims) if dims is not None else None,
        source=_optional_str(body, "source"),
        idempotency_key=_optional_str(body, "idempotency_key") or request.headers.get("Idempotency-Key"),
    )
    try:
        result = await _commit(request, op)
    except (UnknownEpisode, UnknownCall) as missing:
        raise ApiError(404, str(missing), "not_found") from None
    return web.json_response({
        "feedback_id": result.feedback_id,
        "episode_id": op.episode_id,
        "duplicate": result.duplicate,
        "episode_reward": result.episode_reward,
        "infra_error": infra_error,
    })


async def close_episode(request: web.Request) -> web.Response:
    episode_id = request.match_info["episode"]
    try:
        await _commit(request, EpisodeClose(episode_id, _now()))
    except UnknownEpisode as missing:
        raise ApiError(404, str(missing), "not_found") from None
    return web.json_response({"episode_id": episode_id, "status": "closed"})


async def get_episode(request: web.Request) -> web.Response:
    state = request.app[STATE]
    await state.writer.flush(timeout_s=5)  # read your own writes: calls still queued become visible
    try:
        episode = await state.writer.read(state.writer.store.episode, request.match_info["episode"])
    except UnknownEpisode as missing:
        raise ApiError(404, str(missing), "not_found") from None
    return web.json_response(episode)
