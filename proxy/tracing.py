"""OpenTelemetry spans for LLM calls, following the GenAI semantic conventions.

Off unless `[proxy] otel_endpoint` is set (and the `otel` extra installed). One CLIENT span
per recorded call, named `{operation} {model}`, child of the agent's own trace when its
request carried a W3C `traceparent`, exported over OTLP/HTTP in the background
(BatchSpanProcessor: the event loop never waits on the collector). The episode is the
conversation (`gen_ai.conversation.id`), the agent `gen_ai.agent.name`. Prompts and
completions go into spans only with `otel_content = true` (`gen_ai.input.messages`,
`gen_ai.output.messages`, in the conventions' parts shape).
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any, Mapping

from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from flywheel.proxy.conversation import completion_messages, prompt_messages
from flywheel.proxy.responses import RESPONSES
from flywheel.store.records import CallRecord

_OPERATIONS = {"chat.completions": "chat", RESPONSES: "chat", "completions": "text_completion"}
_MAX_TOKENS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class CallTracer:
    """Turns recorded calls into spans; `shutdown` exports what is still buffered."""

    def __init__(self, exporter: SpanExporter, content: bool, service_name: str = "flywheel-proxy"):
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("flywheel.proxy")
        self.content = content

    @classmethod
    def otlp(cls, endpoint: str, content: bool) -> "CallTracer":
        return cls(OTLPSpanExporter(endpoint=endpoint), content)

    @staticmethod
    def parent(headers: Mapping[str, str]) -> Context:
        """The caller's trace context (W3C traceparent), so the call's span joins the agent's trace."""
        return propagate.extract(headers)

    def emit(self, call: CallRecord, parent: Context | None) -> None:
        request = json.loads(call.request) if call.request else {}  # None: its policy kept metadata only
        start_ns = int(call.created_at.timestamp() * 1e9)
        operation = _OPERATIONS.get(call.endpoint, call.endpoint)
        span = self.tracer.start_span(f"{operation} {call.model or ''}".strip(), context=parent, kind=SpanKind.CLIENT,
                                      start_time=start_ns, attributes=_attributes(call, request, operation))
        if self.content and call.stored == "full":
            span.set_attributes(_content(call, request))
        if call.status >= 400:
            span.set_attribute("error.type", str(call.status))
            span.set_status(Status(StatusCode.ERROR, (call.error or "")[:500]))
        span.end(end_time=start_ns + int(timedelta(milliseconds=call.latency_ms).total_seconds() * 1e9))

    def shutdown(self) -> None:
        self.provider.shutdown()


def _attributes(call: CallRecord, request: dict, operation: str) -> dict[str, Any]:
    response = json.loads(call.response) if call.response else {}
    found = {
        "gen_ai.operation.name": operation, "gen_ai.provider.name": "vllm",
        "gen_ai.request.model": call.model, "gen_ai.response.model": call.adapter,
        "gen_ai.response.id": response.get("id"), "gen_ai.conversation.id": call.episode_id,
        "gen_ai.agent.name": call.agent, "gen_ai.request.temperature": call.temperature,
        "gen_ai.request.top_p": call.top_p, "gen_ai.request.stream": call.stream,
        "gen_ai.request.max_tokens": next((request[k] for k in _MAX_TOKENS if isinstance(request.get(k), int)), None),
        "gen_ai.usage.input_tokens": call.prompt_tokens, "gen_ai.usage.output_tokens": call.completion_tokens,
        "gen_ai.response.finish_reasons": [c.get("finish_reason") or "" for c in response.get("choices") or ()],
        "gen_ai.response.time_to_first_chunk": call.ttft_ms / 1000 if call.ttft_ms is not None else None,
        "http.response.status_code": call.status, "flywheel.call_id": call.call_id,
        "flywheel.task_id": call.task_id, "flywheel.endpoint": call.endpoint,
    }
    return {key: value for key, value in found.items() if value is not None}


def _content(call: CallRecord, request: dict) -> dict[str, str]:
    """The prompt and the answer in the conventions' message shape: role plus typed parts."""
    outputs = [{**message, "finish_reason": call.finish_reason}
               for message in completion_messages(json.loads(call.response) if call.response else None)]
    return {"gen_ai.input.messages": json.dumps([_message(m) for m in prompt_messages(call.endpoint, request)]),
            "gen_ai.output.messages": json.dumps([_message(m) for m in outputs])}


def _message(message: dict) -> dict[str, Any]:
    content = message.get("content")
    parts: list[dict[str, Any]] = []
    if isinstance(content, str):
        parts.append({"type": "text", "content": content})
    elif isinstance(content, list):
        parts += [{"type": "text", "content": p.get("text")} for p in content if isinstance(p, dict) and "text" in p]
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        parts.append({"type": "tool_call", "id": call.get("id"), "name": function.get("name"),
                      "arguments": function.get("arguments")})
    if message.get("role") == "tool":
        parts = [{"type": "tool_call_response", "id": message.get("tool_call_id"), "response": content}]
    shaped = {"role": message.get("role"), "parts": parts}
    if "finish_reason" in message:
        shaped["finish_reason"] = message["finish_reason"]
    return shaped
