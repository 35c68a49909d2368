"""OpenTelemetry GenAI spans: one per LLM call, in the agent's trace, content only when enabled."""

import json
from datetime import datetime, timezone

import openai
import pytest
from aiohttp import web

from tests.conftest import Running, eventually

pytest.importorskip("opentelemetry.sdk")  # the `otel` extra, installed with the test extra

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from flywheel.proxy.tracing import CallTracer  # noqa: E402
from flywheel.store.records import CallRecord  # noqa: E402

TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}


def _call(**overrides) -> CallRecord:
    fields = dict(
        call_id="call-1", episode_id="ep-1", agent="planner", created_at=datetime(2026, 12, 1, tzinfo=timezone.utc),
        endpoint="chat.completions", stream=False, model="smollm2", adapter="planner-v3",
        request=json.dumps({"model": "smollm2", "max_tokens": 16,
                            "messages": [{"role": "user", "content": "weather in Oslo?"}]}),
        response=json.dumps({"id": "chatcmpl-9", "choices": [
            {"index": 0, "finish_reason": "tool_calls",
             "message": {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}}]}),
        prompt_token_ids=[1, 2], completion_token_ids=[3], completion_logprobs=[-0.5], finish_reason="tool_calls",
        prompt_tokens=12, completion_tokens=9, latency_ms=250.0, ttft_ms=None, status=200, error=None,
        task_id="t-7", temperature=0.7, top_p=0.9)
    return CallRecord(**{**fields, **overrides})


def _spans(content: bool, *calls: CallRecord):
    exporter = InMemorySpanExporter()
    tracer = CallTracer(exporter, content)
    for call in calls:
        tracer.emit(call, None)
    tracer.shutdown()
    return exporter.get_finished_spans()


def test_a_call_becomes_one_genai_span_without_content_by_default():
    [span] = _spans(False, _call())
    assert span.name == "chat smollm2" and span.kind == SpanKind.CLIENT
    assert (span.end_time - span.start_time) == 250_000_000
    assert span.start_time == int(datetime(2026, 12, 1, tzinfo=timezone.utc).timestamp() * 1e9)
    attributes = dict(span.attributes)
    assert attributes == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "vllm", "gen_ai.request.model": "smollm2",
        "gen_ai.response.model": "planner-v3", "gen_ai.response.id": "chatcmpl-9",
        "gen_ai.conversation.id": "ep-1", "gen_ai.agent.name": "planner", "gen_ai.request.temperature": 0.7,
        "gen_ai.request.top_p": 0.9, "gen_ai.request.stream": False, "gen_ai.request.max_tokens": 16,
        "gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 9,
        "gen_ai.response.finish_reasons": ("tool_calls",), "http.response.status_code": 200,
        "flywheel.call_id": "call-1", "flywheel.task_id": "t-7", "flywheel.endpoint": "chat.completions"}
    assert span.resource.attributes["service.name"] == "flywheel-proxy"


def test_content_when_enabled_and_errors_marked():
    failed = _call(call_id="call-2", status=502, error="upstream unreachable", response=None)
    ok, bad = _spans(True, _call(), failed)
    assert json.loads(ok.attributes["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "weather in Oslo?"}]}]
    assert json.loads(ok.attributes["gen_ai.output.messages"]) == [
        {"role": "assistant", "finish_reason": "tool_calls", "parts": [
            {"type": "tool_call", "id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}]}]
    assert bad.status.status_code == StatusCode.ERROR and bad.attributes["error.type"] == "502"
    assert "upstream unreachable" in bad.status.description


async def test_the_proxy_exports_spans_over_otlp_into_the_agents_trace(start_proxy):
    """A real OTLP/HTTP receiver: the span arrives as protobuf, parented by the caller's traceparent."""
    received: list[ExportTraceServiceRequest] = []

    async def collect(request: web.Request) -> web.Response:
        received.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    collector = await Running(app).start()
    try:
        proxy = await start_proxy(otel_endpoint=f"{collector.url}/v1/traces")
        trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/planner/episodes/ep-otel/v1", api_key="x",
                                    default_headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
        await client.responses.create(model="m", input="hi")
        await proxy.stop()  # exports what the batch processor still holds
        await eventually(lambda: received, 10, "a span export")
    finally:
        await collector.stop()
    [span] = [s for r in received for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert span.trace_id.hex() == trace_id and span.parent_span_id.hex() == parent_id
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["gen_ai.conversation.id"].string_value == "ep-otel"
    assert attributes["gen_ai.agent.name"].string_value == "planner"
    assert attributes["flywheel.endpoint"].string_value == "responses"
    assert "gen_ai.input.messages" not in attributes
