"""`/v1/adapters`: list, register (hot-swap in, or as a canary candidate), promote, reject and roll
back adapter versions."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from aiohttp import web

from flywheel.proxy.attribution import new_id
from flywheel.proxy.audit import audit
from flywheel.proxy.errors import ApiError, read_json_object
from flywheel.proxy.registry import row_json
from flywheel.proxy.state import STATE
from flywheel.store.proto_map import train_run_record


async def list_adapters(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].registry.snapshot())


async def register_adapter(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    agent, path = body.get("agent"), body.get("path")
    if not isinstance(agent, str) or not isinstance(path, str):
        raise ApiError(400, "'agent' and 'path' (a PEFT adapter directory) are required strings", "invalid_field")
    base_model = body.get("base_model")
    if base_model is not None and not isinstance(base_model, str):
        raise ApiError(400, "'base_model' must be a string", "invalid_field")
    train_run = body.get("train_run")
    if train_run is not None and not isinstance(train_run, dict):
        raise ApiError(400, "'train_run' must be an object of update metrics", "invalid_field")
    state = request.app[STATE]
    canary = body.get("canary")
    if canary is None:  # the learner's publishes (they carry their train run) follow [promotion] mode
        canary = train_run is not None and state.rollout.config.mode == "canary"
    if not isinstance(canary, bool):
        raise ApiError(400, "'canary' must be true or false", "invalid_field")
    state.require_writable_store()  # a version that cannot be recorded never goes live
    # shielded: a client that hangs up mid-registration leaves the registry whole, not half-changed
    version = await asyncio.shield(state.registry.register(agent, path, base_model, canary))
    state.metrics.adapter_swaps.labels(agent, "candidate" if canary else "register").inc()
    await audit(request, "adapter_register", version.row.served_name,
                detail={"agent": agent, "path": path, "canary": canary})
    if train_run is not None:
        await state.writer.submit(train_run_record(train_run, version.row, new_id("run"), datetime.now(timezone.utc)))
    return web.json_response(row_json(version.row), status=201)


async def rollback_adapter(request: web.Request) -> web.Response:
    agent = request.match_info["agent"]
    state = request.app[STATE]
    target = await asyncio.shield(state.registry.rollback(agent, await _reason(request, "rolled back by hand")))
    state.metrics.adapter_swaps.labels(agent, "rollback").inc()
    await audit(request, "adapter_rollback", agent, detail={"current": target.served_name if target else None})
    return web.json_response({"agent": agent, "current": target.served_name if target else None})


def decide_candidate(action: str):
    """`promote`: the agent's candidate made active now, whatever its comparison says; `reject`:
    taken off its canary slice now."""
    done = {"promote": "promoted", "reject": "rejected"}[action]

    async def decide(request: web.Request) -> web.Response:
        agent = request.match_info["agent"]
        state = request.app[STATE]
        registry_change = state.registry.promote if action == "promote" else state.registry.reject
        version = await asyncio.shield(registry_change(agent, await _reason(request, f"{done} by hand")))
        state.metrics.adapter_swaps.labels(agent, action).inc()
        await audit(request, f"adapter_{action}", version.row.served_name, detail={"agent": agent})
        return web.json_response(row_json(version.row))

    return decide


async def _reason(request: web.Request, default: str) -> str:
    """The optional {"reason": "..."} of a decision by hand, kept in the version's row."""
    if not await request.read():
        return default
    reason = (await read_json_object(request)).get("reason", default)
    if not isinstance(reason, str):
        raise ApiError(400, "'reason' must be a string", "invalid_field")
    return reason if reason == default else f"{default}: {reason}"
