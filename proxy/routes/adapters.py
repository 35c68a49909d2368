"""`/v1/adapters`: list, register (hot-swap in) and roll back adapter versions."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from aiohttp import web

from flywheel.proxy.attribution import new_id
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
    state.require_writable_store()  # a version that cannot be recorded never goes live
    # shielded: a client that hangs up mid-registration leaves the registry whole, not half-changed
    version = await asyncio.shield(state.registry.register(agent, path, base_model))
    state.metrics.adapter_swaps.labels(agent, "register").inc()
    if train_run is not None:
        await state.writer.submit(train_run_record(train_run, version.row, new_id("run"), datetime.now(timezone.utc)))
    return web.json_response(row_json(version.row), status=201)


async def rollback_adapter(request: web.Request) -> web.Response:
    agent = request.match_info["agent"]
    state = request.app[STATE]
    target = await asyncio.shield(state.registry.rollback(agent))
    state.metrics.adapter_swaps.labels(agent, "rollback").inc()
    return web.json_response({"agent": agent, "current": target.served_name if target else None})
