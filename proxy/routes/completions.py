"""`/v1/chat/completions`, `/v1/completions`, `/v1/responses`: forwarding LLM calls
to the upstream, streaming or not, and recording each one. A Responses call goes upstream as a
chat completion (`flywheel.proxy.responses`), so it is captured and recorded like one."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson
from aiohttp import web

from flywheel.proxy.attribution import Attribution, attribute, new_id
from flywheel.proxy.capture import CHAT, Capture, Wants, strip_unrequested, upstream_body
from flywheel.proxy.errors import MAX_ERROR_CHARS, ApiError, error_body, error_response, read_json_object
from flywheel.proxy.policy import STORE_HEADER, TRAIN_HEADER, CallPolicy, kept
from flywheel.proxy.redaction import Redaction
from flywheel.proxy.registry import Version
from flywheel.proxy.responses import RESPONSES, ResponseEvents, chat_request, response_object
from flywheel.proxy.routes.governed import admit, govern
from flywheel.proxy.sampling import Sampling, resolve
from flywheel.proxy.state import STATE, ProxyState
from flywheel.proxy.upstream import UpstreamError, UpstreamResponse
from flywheel.store.records import CallRecord, Untrainable


@dataclass
class _Call:
    """One call in flight: what the handler knows so far, turned into a CallRecord at the end."""

    state: ProxyState
    endpoint: str
    who: Attribution
    call_id: str
    created_at: datetime
    started: float  # perf_counter at arrival
    request_json: str
    model: str | None
    stream: bool
    capture: Capture  # of the upstream's answer: its endpoint is the one called upstream
    sampling: Sampling
    events: ResponseEvents | None  # a Responses call: what turns the chat answer into the client's format
    trace_parent: Any  # the caller's trace context, when spans are on
    policy: CallPolicy  # what the store keeps of it, and whether it may be trained on
    redaction: Redaction | None  # the placeholders its request got, when redaction is on
    ttft_ms: float | None = None
    upstream_s: float = 0.0  # time spent waiting for the upstream's answer to begin
    upstream: UpstreamResponse | None = None  # its answer, which counts the time spent waiting for its body
    capture_error: str | None = None  # an error event the upstream sent inside the stream
    recorded: bool = False
    stream_response: web.StreamResponse | None = None  # once an SSE response to the client has begun
    forward: dict = field(default_factory=dict)  # the body sent upstream
    version: Version | None = None  # the adapter version it was routed to (None: the base model)

    def for_client(self, raw: bytes) -> bytes:
        """Response bytes as the client gets them: with the originals back, under redact_restore."""
        if self.redaction is not None and self.redaction.originals and self.state.rules.config.redact_restore:
            return self.redaction.restore(raw)
        return raw

    def overhead_s(self) -> float:
        """Time in Flywheel so far: all of it but the waits on the upstream."""
        waited = self.upstream_s + (self.upstream.waited_s if self.upstream is not None else 0.0)
        return time.perf_counter() - self.started - waited

    def ids(self) -> dict[str, str]:
        """The response's Flywheel headers. The overhead so far: a stream's, until its first byte."""
        ids = {"X-Flywheel-Episode": self.who.episode_id, "X-Flywheel-Call": self.call_id,
               "X-Flywheel-Overhead-Ms": f"{self.overhead_s() * 1000:.3f}"}
        if self.policy != CallPolicy():  # the client hears what its rules and headers came to
            ids.update({STORE_HEADER: self.policy.store, TRAIN_HEADER: str(self.policy.train).lower()})
        return ids

    def mark_first_token(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.started) * 1000

    async def record(self, status: int, error: str | None = None) -> None:
        """Queue the call's record (once). Called before the client has the whole response, so
        anything the client does next (feedback, a SQL read) finds the call already queued."""
        if self.recorded:
            return
        cap = self.capture
        record = CallRecord(
            call_id=self.call_id,
            episode_id=self.who.episode_id,
            agent=self.who.agent,
            created_at=self.created_at,
            endpoint=self.endpoint,
            stream=self.stream,
            model=self.model,
            adapter=cap.model,
            request=self.request_json,
            response=orjson.dumps(cap.response_json()).decode() if cap.choices else None,
            prompt_token_ids=cap.prompt_token_ids,
            completion_token_ids=cap.completion_token_ids(),
            completion_logprobs=cap.completion_logprobs(),
            finish_reason=cap.first.finish_reason,
            prompt_tokens=cap.prompt_tokens(),
            completion_tokens=cap.completion_tokens(),
            latency_ms=(time.perf_counter() - self.started) * 1000,
            ttft_ms=self.ttft_ms,
            status=status,
            error=error,
            task_id=self.who.task_id,
            redactions=orjson.dumps(self.redaction.counts).decode() if self.redaction and self.redaction.counts else None,
            **asdict(self.sampling),
        )
        record = kept(record, self.policy)
        erased = self.who.episode_id in self.state.erased  # while it ran: its record must not bring it back
        if self.policy.store == "none":
            self.state.untrainable.add(self.who.episode_id)
            await self.state.writer.put(Untrainable(self.who.episode_id))
        elif not erased:  # if this wait is cancelled (the client left), the 499 is recorded
            await self.state.writer.put(record)
        self.recorded = True
        self._count(status)
        if erased or self.policy.store == "none":
            return
        if self.state.shadows is not None and status == 200 and error is None and self.policy.train:
            self.state.shadows.offer(
                call_id=self.call_id, episode_id=self.who.episode_id, agent=self.who.agent, task_id=self.who.task_id,
                endpoint=self.endpoint, request_json=self.request_json, client_model=self.model, capture=cap,
                forward=self.forward, sampling=self.sampling, version=self.version)
        if self.state.tracer is not None:
            self.state.tracer.emit(record, self.trace_parent)


    def _count(self, status: int) -> None:
        metrics, agent, cap = self.state.metrics, self.who.agent, self.capture
        metrics.calls.labels(agent, str(status)).inc()
        metrics.overhead.labels(agent).observe(self.overhead_s())
        for detector, count in (self.redaction.counts.items() if self.redaction else ()):
            metrics.redactions.labels(detector).inc(count)
        if self.ttft_ms is not None:
            metrics.ttft.labels(agent).observe(self.ttft_ms / 1000)
        for kind, count in (("prompt", cap.prompt_tokens()), ("completion", cap.completion_tokens())):
            if count:
                metrics.tokens.labels(agent, kind).inc(count)


def completion_handler(endpoint: str):
    async def handler(request: web.Request) -> web.StreamResponse:
        return await _forward(request, endpoint)

    return handler


async def _forward(request: web.Request, endpoint: str) -> web.StreamResponse:
    state = request.app[STATE]
    started = time.perf_counter()
    created_at = datetime.now(timezone.utc)
    body = await read_json_object(request)
    who = attribute(request.match_info, request.headers, body, state.config.default_agent)
    redaction = Redaction(state.rules.detectors) if state.rules.detectors else None
    if redaction is not None:  # before anything is recorded or forwarded: the model sees placeholders only
        redaction.body(body)
    governed = govern(request, state, who)
    request_json = orjson.dumps(body).decode()  # as the client sent it (redacted): before defaults are filled in
    events = ResponseEvents(body) if endpoint == RESPONSES else None
    upstream_endpoint = CHAT if events else endpoint
    forward, wants = upstream_body(chat_request(body) if events else body, upstream_endpoint)
    call = _Call(
        state=state, endpoint=endpoint, who=who, call_id=new_id("call"), created_at=created_at,
        started=started, request_json=request_json, model=body.get("model"),
        stream=bool(body.get("stream")), capture=Capture(upstream_endpoint),
        sampling=resolve(forward, state.config.sampling_defaults), events=events,
        trace_parent=state.tracer.parent(request.headers) if state.tracer is not None else None, policy=governed.policy,
        redaction=redaction,
    )
    headers = state.config.upstream_headers()
    if state.config.serve_model:
        forward["model"] = state.config.serve_model
    version = call.version = state.registry.route(who.agent, forward.get("model"), who.episode_id)
    if version is not None:
        forward["model"] = version.served_name
    call.forward = forward
    ticket = None
    try:
        ticket = admit(state, governed, who)
        return await _exchange(request, call, forward, headers, wants)
    finally:
        if ticket is not None:
            state.quotas.release(ticket, (call.capture.prompt_tokens() or 0) + (call.capture.completion_tokens() or 0))
        if version is not None:
            state.registry.release(version)


async def _exchange(request: web.Request, call: _Call, forward: dict, headers: dict,
                    wants: Wants) -> web.StreamResponse:
    state = call.state
    upstream: UpstreamResponse | None = None
    try:
        async with asyncio.timeout(state.config.upstream_timeout_s):
            waited = time.perf_counter()
            upstream = await state.upstream.post(call.who.episode_id or call.call_id, "/" + call.capture.endpoint.replace(".", "/"),
                                                 orjson.dumps(forward), headers)
            call.upstream_s, call.upstream = time.perf_counter() - waited, upstream
            if upstream.status != 200:
                return await _relay_error(request, call, upstream)
            if call.stream:
                return await _relay_stream(request, call, upstream, wants)
            return await _relay_whole(request, call, upstream, wants)
    except (UpstreamError, TimeoutError) as failure:
        timed_out = isinstance(failure, TimeoutError)
        status = 504 if timed_out else 502
        message = (
            f"upstream did not answer within {state.config.upstream_timeout_s:g} s"
            if timed_out else f"upstream unreachable: {failure}"
        )
        code = "upstream_timeout" if timed_out else "upstream_unreachable"
        await call.record(status, message)
        if call.stream_response is not None:  # the stream to the client is under way: end it with an error event
            await _ignoring_hangup(call.stream_response.write(_stream_error(call, error_body(status, message, code))))
            await _ignoring_hangup(call.stream_response.write_eof())
            return call.stream_response
        return error_response(status, message, code, headers=call.ids())
    except asyncio.CancelledError:
        # the client went away (aiohttp cancels the handler): the call is recorded as such, and
        # closing its upstream connection below makes vLLM abort the generation
        await call.record(499, f"client disconnected before the {'stream' if call.stream else 'response'} ended")
        raise
    finally:
        if upstream is not None:
            state.upstream.abort(upstream)  # not read to its end: the connection is not reused


async def _relay_error(request: web.Request, call: _Call, upstream: UpstreamResponse) -> web.Response:
    """Upstream said no: the client gets its status and body, the call is recorded with it."""
    raw = await upstream.read()
    await call.record(upstream.status, raw.decode(errors="replace")[:MAX_ERROR_CHARS])
    return web.Response(status=upstream.status, body=raw, headers=call.ids(), content_type=upstream.content_type)


async def _relay_whole(request: web.Request, call: _Call, upstream: UpstreamResponse,
                       wants: Wants) -> web.Response:
    raw = await upstream.read()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    content_type, error = "application/json", None
    if isinstance(data, dict):
        call.capture.add(data)
        if call.events:
            raw = orjson.dumps(response_object(call.events.request, call.capture, call.events.ids,
                                               call.events.created_at))
        elif not wants.everything:
            strip_unrequested(data, call.endpoint, wants)
            raw = orjson.dumps(data)
    else:  # relayed as it came; nothing in it to capture
        content_type, error = upstream.content_type, "upstream answered 200 with a body that is not a JSON object"
    await call.record(200, error)
    return web.Response(body=call.for_client(raw), content_type=content_type, headers=call.ids())


async def _relay_stream(request: web.Request, call: _Call, upstream: UpstreamResponse,
                        wants: Wants) -> web.StreamResponse:
    """Relay SSE events as they arrive, capturing each `data:` chunk on the way."""
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache", **call.ids(),
    })
    await response.prepare(request)
    call.stream_response = response
    if call.events:
        await response.write(call.events.begin())
    error: str | None = None
    status = 200
    pending = b""
    try:
        async for block in upstream.iter_chunks():
            *lines, pending = (pending + block).split(b"\n")
            if lines:  # a block without a newline only extends the pending line
                await _relay_lines(response, call, lines, wants)
        if pending:
            await _relay_lines(response, call, [pending], wants)
    except (UpstreamError, TimeoutError) as broken:
        error, status = f"upstream stream broke: {broken!r}", 502
        await _ignoring_hangup(response.write(_stream_error(call, error_body(502, error, "upstream_stream_broken"))))
    except ConnectionResetError:
        error, status = "client disconnected before the stream ended", 499
    await call.record(status, error or call.capture_error)  # a stream that ended without [DONE]
    await _ignoring_hangup(response.write_eof())
    return response


async def _relay_lines(response: web.StreamResponse, call: _Call, lines: list[bytes], wants: Wants) -> None:
    """Relay complete SSE lines; the call is recorded just before `data: [DONE]` goes out, since
    a client stops reading there and may post its feedback at once."""
    done = next((i for i, line in enumerate(lines) if line.strip() == b"data: [DONE]"), None)
    out = [_relay_line(call, line, wants) for line in lines]
    if done is not None:
        if done:
            await response.write(_joined(call, out[:done]))
        await call.record(200, call.capture_error)
        if call.events:  # the Responses stream ends with the whole Response instead
            out[done] = call.events.end(call.capture)
        out = out[done:]
    await response.write(_joined(call, out))


def _joined(call: _Call, out: list[bytes]) -> bytes:
    """Relayed SSE lines back together; Responses events come whole, with their own framing."""
    return call.for_client(b"".join(out) if call.events else b"\n".join(out) + b"\n")


def _stream_error(call: _Call, body: dict) -> bytes:
    """An error event in the client's stream format."""
    return call.events.error(body) if call.events else b"data: " + orjson.dumps(body) + b"\n\n"


async def _ignoring_hangup(write) -> None:
    """Await a write to the client; a client that already left is not an error here."""
    try:
        await write
    except ConnectionResetError:
        pass


def _relay_line(call: _Call, line: bytes, wants: Wants) -> bytes:
    """One SSE line for the client, its chunk captured on the way (a Responses stream gets the
    events the chunk makes, and nothing for the upstream's own framing)."""
    payload = line[5:].strip() if line.startswith(b"data:") else None
    if payload is None or payload == b"[DONE]":
        return b"" if call.events else line
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return b"" if call.events else line
    if "error" in chunk and not chunk.get("choices"):
        call.capture_error = orjson.dumps(chunk["error"]).decode()[:MAX_ERROR_CHARS]
    if call.capture.add(chunk):
        call.mark_first_token()
    if call.events:
        return call.events.error(chunk) if call.capture_error and "error" in chunk else call.events.chunk(chunk)
    if wants.everything:
        return line
    strip_unrequested(chunk, call.endpoint, wants)
    return b"data: " + orjson.dumps(chunk)


async def stored_response_handler(request: web.Request) -> web.Response:
    """`GET`/`DELETE /v1/responses/{id}`: Flywheel keeps no responses to hand back."""
    raise ApiError(400, "Flywheel does not keep responses for retrieval ('store' is ignored); every call is in "
                        "the store: SELECT response FROM calls WHERE endpoint = 'responses'", "unsupported_field")
