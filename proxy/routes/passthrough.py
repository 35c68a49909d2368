"""The upstream's other routes an OpenAI client or a vLLM tool calls: `/v1/models` and
`/v1/models/{id}`, `/v1/embeddings`, `/tokenize`, `/detokenize`. Forwarded as they are
(never vLLM's admin routes), each logged in `passthrough` with its agent, the episode the
client named (none is opened for it), status and latency. Nothing here is trained on. The
data policies, limits and redaction apply as to LLM calls: `none` leaves no row, `metadata`
no error text, the texts to embed or tokenize are redacted before they go upstream."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import orjson
from aiohttp import web

from flywheel.proxy.attribution import attribute, new_id
from flywheel.proxy.errors import MAX_ERROR_CHARS, ApiError
from flywheel.proxy.redaction import Redaction
from flywheel.proxy.routes.governed import admit, govern
from flywheel.proxy.state import STATE, ProxyState
from flywheel.store.records import WITHHELD_ERROR, PassthroughRecord


# (method, path from the upstream's root): the routes forwarded as they are
FORWARDED = (("POST", "/v1/embeddings"), ("POST", "/tokenize"), ("POST", "/detokenize"))


def forward_handler(path: str):
    async def handler(request: web.Request) -> web.Response:
        state = request.app[STATE]
        started, created_at = time.perf_counter(), datetime.now(timezone.utc)
        who = attribute(request.match_info, request.headers, {}, state.config.default_agent, fresh_episode=False)
        governed = govern(request, state, who)  # as an LLM call's: its policy, limits and redaction
        body = _redacted(state, await request.read()) if request.method == "POST" else None
        ticket = admit(state, governed, who)
        try:
            status, raw, content_type = await state.upstream.admin().forward(request.method, path, body)
        finally:
            state.quotas.release(ticket, 0)
        call_id = new_id("call")
        if governed.policy.store != "none":
            error = raw.decode(errors="replace")[:MAX_ERROR_CHARS] if status >= 400 else None
            await state.writer.put(PassthroughRecord(
                call_id=call_id, agent=who.agent, episode_id=who.episode_id, created_at=created_at,
                method=request.method, path=path, status=status, latency_ms=(time.perf_counter() - started) * 1000,
                request_bytes=len(body or b""), response_bytes=len(raw),
                error=error if governed.policy.store == "full" or error is None else WITHHELD_ERROR))
        return web.Response(status=status, body=raw, content_type=content_type, headers={"X-Flywheel-Call": call_id})

    return handler


def _redacted(state: ProxyState, body: bytes) -> bytes:
    """The body with [proxy] redact applied to its texts (a body that is not a JSON object goes as it
    is: the upstream refuses it, and nothing of it is stored)."""
    if not state.rules.detectors:
        return body
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(parsed, dict):
        return body
    Redaction(state.rules.detectors).body(parsed)
    return orjson.dumps(parsed)


async def models_handler(request: web.Request) -> web.Response:
    status, body, content_type = await request.app[STATE].upstream.admin().get("models")
    return web.Response(status=status, body=body, content_type=content_type)


async def model_handler(request: web.Request) -> web.Response:
    """`GET /v1/models/{id}`: the model's entry in the upstream's list (vLLM serves only the list)."""
    status, body, content_type = await request.app[STATE].upstream.admin().get("models")
    if status != 200:
        return web.Response(status=status, body=body, content_type=content_type)
    wanted = request.match_info["model"]
    try:
        models = orjson.loads(body).get("data") or []
    except (orjson.JSONDecodeError, AttributeError):
        raise ApiError(502, "upstream's /v1/models is not a JSON object", "upstream_invalid") from None
    for model in models:
        if isinstance(model, dict) and model.get("id") == wanted:
            return web.json_response(model, dumps=lambda v: orjson.dumps(v).decode())
    raise ApiError(404, f"the model {wanted!r} does not exist", "model_not_found")
