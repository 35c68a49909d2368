"""`POST /v1/learner/train`, `GET /v1/learner/status`: the learner, reached through the proxy;
`POST /v1/learner/runs`: the learner records an update its guards held back (published ones are
recorded with their version, by `POST /v1/adapters`)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import grpc
from aiohttp import web
from google.protobuf.json_format import MessageToDict

from flywheel.proxy.attribution import new_id
from flywheel.proxy.audit import audit
from flywheel.proxy.errors import ApiError, read_json_object
from flywheel.proxy.feed import Feed
from flywheel.proxy.state import STATE
from flywheel.store.proto_map import train_run_record


_QUARANTINED = ("SELECT episode_id, quarantined_at, push_error FROM episodes WHERE quarantined_at IS NOT NULL "
                "ORDER BY quarantined_at DESC")


def _feed(request: web.Request) -> Feed:
    feed = request.app[STATE].feed
    if feed is None:
        raise ApiError(409, "no learner configured: start the proxy with learner = \"host:port\"", "no_learner")
    return feed


def _as_dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True)


async def train(request: web.Request) -> web.StreamResponse:
    """Start an update now; streams its events as JSON lines (all of them with {"wait": true})."""
    feed = _feed(request)
    body = await read_json_object(request) if await request.read() else {}  # an empty body: defaults
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await audit(request, "train", detail={"wait": bool(body.get("wait")), "force": bool(body.get("force"))})
    try:
        await feed.push_ready()  # everything ready goes into this update
        events = feed.train(wait=bool(body.get("wait")), force=bool(body.get("force")))
        await response.prepare(request)
        async for event in events:
            await response.write(json.dumps(_as_dict(event)).encode() + b"\n")
    except grpc.aio.AioRpcError as failure:
        if not response.prepared:
            raise ApiError(502, f"learner at {feed.target} unreachable: {failure.details()}", "learner_unreachable")
        await response.write(json.dumps({"error": failure.details()}).encode() + b"\n")
    await response.write_eof()
    return response


async def status(request: web.Request) -> web.Response:
    """The feed's health, the quarantined episodes (with their errors, from the store) and the learner's status."""
    feed = _feed(request)
    writer = request.app[STATE].writer
    quarantined = await writer.read(writer.store.query, _QUARANTINED, 20, 10)
    out = {**feed.health(), "feed_error": feed.last_error,
           "quarantined": [dict(zip(quarantined["columns"], row)) for row in quarantined["rows"]]}
    try:
        out.update(_as_dict(await feed.status()))
    except grpc.aio.AioRpcError as failure:
        out["learner_error"] = f"{failure.code().name}: {failure.details()}"
    return web.json_response(out)


async def record_held_run(request: web.Request) -> web.Response:
    """{"train_run": UpdateMetrics as JSON, with "held": why}: a `train_runs` row without a version."""
    run = (await read_json_object(request)).get("train_run")
    if not isinstance(run, dict) or not isinstance(run.get("held"), str) or not run["held"] \
            or not isinstance(run.get("agent"), str):
        raise ApiError(400, "'train_run' must be an object of update metrics with 'agent' and 'held' (why)",
                       "invalid_field")
    state = request.app[STATE]
    state.require_writable_store()
    record = train_run_record(run, None, new_id("run"), datetime.now(timezone.utc))
    await state.writer.submit(record)
    return web.json_response({"run_id": record.run_id}, status=201)
