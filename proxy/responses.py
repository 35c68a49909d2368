"""The Responses API (`POST /v1/responses`) over chat completions.

The OpenAI Agents SDK and LangChain's `use_responses_api=True` call `/v1/responses`.
vLLM's own implementation does not return token ids and logprobs reliably, so the proxy
translates instead: the request becomes a chat completion (`chat_request`), which is
forwarded, captured and recorded exactly like any chat call, and the captured answer
becomes a Response object (`response_object`) or, streamed, the Responses event sequence
(`ResponseEvents`). Pure functions and one stateful translator; no I/O.

What Flywheel does not keep is refused with a 400 naming the field: `previous_response_id`,
`conversation`, `background`, stored prompts, and hosted tools (web search, file search,
code interpreter, ...); `store` is accepted and ignored, since responses are recorded in
the store (SQL) but not kept for `GET /v1/responses/{id}`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from flywheel.proxy.attribution import new_id
from flywheel.proxy.capture import Capture
from flywheel.proxy.errors import ApiError

RESPONSES = "responses"

# Responses fields with no chat equivalent that change nothing about sampling: accepted, not forwarded.
_IGNORED = {"store", "include", "stream_options", "truncation", "user", "service_tier", "safety_identifier",
            "prompt_cache_key", "prompt_cache_retention", "reasoning", "max_tool_calls", "metadata", "top_logprobs"}
# state kept on OpenAI's side: Flywheel forwards every call whole and keeps nothing to refer back to
_REFUSED = {
    "previous_response_id": "Flywheel keeps no response state: send the whole conversation in 'input'",
    "conversation": "Flywheel keeps no conversations: send the whole conversation in 'input'",
    "background": "Flywheel answers in the foreground only: leave 'background' out or false",
    "prompt": "stored prompts live on OpenAI's side: send 'instructions' and 'input' instead",
}
# chat-completion fields with the same meaning: forwarded under these names
_RENAMED = {"max_output_tokens": "max_tokens"}
_TEXT_PARTS = {"input_text", "output_text", "text", "refusal", "reasoning_text", "summary_text"}


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """The chat-completion body for a Responses request; raises a 400 ApiError naming any field
    Flywheel cannot honour. Fields the Responses API does not define (vLLM's `top_k`, ...)
    are forwarded as they are."""
    for name, why in _REFUSED.items():
        if body.get(name) not in (None, False):
            raise ApiError(400, f"'{name}' is not supported: {why}", "unsupported_field")
    if "input" not in body and "instructions" not in body:
        raise ApiError(400, "'input' is required", "missing_field")
    chat: dict[str, Any] = {"messages": chat_messages(body)}
    for name, value in body.items():
        if name in ("input", "instructions", "tools", "tool_choice", "text") or name in _IGNORED or name in _REFUSED:
            continue
        chat[_RENAMED.get(name, name)] = value
    if body.get("tools"):
        chat["tools"] = [_chat_tool(tool) for tool in _list(body, "tools")]
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _chat_tool_choice(body["tool_choice"])
    response_format = _response_format(body.get("text"))
    if response_format:
        chat["response_format"] = response_format
    if body.get("top_logprobs"):
        chat["logprobs"], chat["top_logprobs"] = True, body["top_logprobs"]
    if body.get("stream"):
        chat["stream_options"] = {"include_usage": True}  # the Response's usage comes from the last chunk
    return chat


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """`instructions` (a system message) then `input` (a string: one user message; or items:
    messages, function calls and their outputs) as chat messages. Reasoning items are dropped:
    chat models take no reasoning back."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions:
        messages.append({"role": "system", "content": _text(instructions, "instructions")})
    items = body.get("input", [])
    if isinstance(items, str):
        return messages + [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise ApiError(400, "'input' must be a string or a list of items", "invalid_field")
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            raise ApiError(400, f"input[{position}] must be an object", "invalid_field")
        kind = item.get("type", "message")
        if kind == "message":
            role = {"developer": "system"}.get(item.get("role"), item.get("role"))
            if role not in ("user", "assistant", "system"):
                raise ApiError(400, f"input[{position}].role must be user, assistant, system or developer, "
                                    f"got {item.get('role')!r}", "invalid_field")
            messages.append({"role": role, "content": _content(item.get("content"), f"input[{position}].content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
            previous = messages[-1] if messages else None
            if previous is not None and previous["role"] == "assistant":  # one assistant turn: its text and calls
                previous.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": _text(item.get("output", ""), f"input[{position}].output")})
        elif kind != "reasoning":
            raise ApiError(400, f"input[{position}]: items of type {kind!r} are not supported (Flywheel keeps no "
                                "stored items and runs no hosted tools)", "unsupported_field")
    return messages


def _list(body: dict, name: str) -> list:
    if not isinstance(body[name], list):
        raise ApiError(400, f"'{name}' must be a list", "invalid_field")
    return body[name]


def _text(value: Any, where: str) -> str:
    """A string, or the text of a list of text parts joined by newlines (as vLLM joins them)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") in _TEXT_PARTS for p in value):
        return "\n".join(p.get("text", "") for p in value)
    raise ApiError(400, f"{where} must be a string or a list of text parts", "invalid_field")


def _content(value: Any, where: str) -> Any:
    """Message content: text stays text; images become chat `image_url` parts."""
    if isinstance(value, list) and any(isinstance(p, dict) and p.get("type") == "input_image" for p in value):
        return [{"type": "image_url", "image_url": {"url": p.get("image_url")}} if p.get("type") == "input_image"
                else {"type": "text", "text": _text([p], where)} for p in value]
    return _text(value, where)


def _chat_tool(tool: Any) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else tool
        raise ApiError(400, f"tools: hosted tool {kind!r} is not supported (Flywheel serves your own model); "
                            "declare it as a function tool", "unsupported_field")
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise ApiError(400, "tools: a function tool needs a 'name'", "invalid_field")
    function = {"name": tool["name"], "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise ApiError(400, f"tool_choice {choice!r} is not supported: use auto, none, required or a function",
                   "unsupported_field")


def _response_format(text: Any) -> dict[str, Any] | None:
    """`text.format` as a chat `response_format` (None for plain text)."""
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is not None and not isinstance(fmt, dict):
        raise ApiError(400, "text.format must be an object", "invalid_field")
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        schema = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise ApiError(400, f"text.format {fmt.get('type')!r} is not supported", "unsupported_field")


@dataclass
class _Ids:
    """The ids of one response's output items, fixed on first use so the stream and the
    final object agree."""

    response: str = field(default_factory=lambda: new_id("resp"))
    items: dict[tuple[str, int], str] = field(default_factory=dict)

    def item(self, kind: str, index: int = 0) -> str:
        prefix = {"message": "msg", "function_call": "fc", "reasoning": "rs"}[kind]
        return self.items.setdefault((kind, index), new_id(prefix))


def _usage(capture: Capture) -> dict[str, Any]:
    inputs, outputs = capture.prompt_tokens() or 0, capture.completion_tokens() or 0
    return {"input_tokens": inputs, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0}, "output_tokens": outputs,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": inputs + outputs}


def _output_items(capture: Capture, ids: _Ids) -> list[dict[str, Any]]:
    """Choice 0 as Response output items: reasoning, the message, then one item per tool call."""
    choice, items = capture.first, []
    reasoning = "".join(choice.reasoning)
    if reasoning:
        items.append(_reasoning_item(ids.item("reasoning"), reasoning))
    text = "".join(choice.text)
    if text or not choice.tool_calls:
        items.append(_message_item(ids.item("message"), text, "completed"))
    for index in sorted(choice.tool_calls):
        call = choice.tool_calls[index]
        items.append(_function_call_item(ids.item("function_call", index), call, "completed"))
    return items


def _reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [_text_part(text)] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _function_call_item(item_id: str, call: dict, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call.get("id") or item_id,
            "name": call["function"]["name"], "arguments": call["function"]["arguments"] if status == "completed"
            else "", "status": status}


def response_object(request: dict[str, Any], capture: Capture | None, ids: _Ids, created_at: float,
                    status: str | None = None) -> dict[str, Any]:
    """The Response for `request` with the captured answer (status from its finish reason:
    `length` makes it incomplete), or with no output yet while it is in progress."""
    finish = capture.first.finish_reason if capture else None
    status = status or ("incomplete" if finish == "length" else "completed")
    metadata = request.get("metadata") if isinstance(request.get("metadata"), dict) else {}
    return {
        "id": ids.response, "object": "response", "created_at": created_at, "status": status,
        "model": (capture.model if capture else None) or request.get("model"),
        "output": _output_items(capture, ids) if capture and status != "in_progress" else [],
        "usage": _usage(capture) if capture and status != "in_progress" else None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "error": None, "instructions": request.get("instructions"), "metadata": metadata,
        "max_output_tokens": request.get("max_output_tokens"), "temperature": request.get("temperature"),
        "top_p": request.get("top_p"), "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "tool_choice": request.get("tool_choice", "auto"), "tools": request.get("tools") or [],
        "text": request.get("text") or {"format": {"type": "text"}}, "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None}, "store": False, "truncation": "disabled",
    }


class ResponseEvents:
    """Chat-completion chunks in, the Responses SSE event sequence out: `response.created`,
    then for each output item `output_item.added`, its deltas and `.done` events, then
    `response.completed` (or `response.incomplete`). Items open in the order their first
    delta arrives; one item is open at a time, as in OpenAI's streams."""

    def __init__(self, request: dict[str, Any]):
        self.request = request
        self.ids = _Ids()
        self.created_at = time.time()
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # items done so far, as `output_item.done` sent them
        self.open: tuple[str, int] | None = None  # (kind, tool call index) of the item receiving deltas
        self.text: list[str] = []  # the open item's text or arguments so far
        self.call: dict[str, Any] = {}  # the open function call's id and name

    def begin(self) -> bytes:
        shell = response_object(self.request, None, self.ids, self.created_at, "in_progress")
        return self._event("response.created", response=shell) + self._event("response.in_progress", response=shell)

    def chunk(self, data: dict[str, Any]) -> bytes:
        """The events for one chat chunk (its choice 0)."""
        out = b""
        for raw in data.get("choices") or ():
            if raw.get("index", 0) != 0:
                continue
            delta = raw.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                out += self._delta(("reasoning", 0), reasoning)
            if delta.get("content"):
                out += self._delta(("message", 0), delta["content"])
            for position, call in enumerate(delta.get("tool_calls") or ()):
                key = ("function_call", call.get("index", position))
                if self.open != key:
                    out += self._close()
                    self.call = {"id": call.get("id"), "function": {"name": (call.get("function") or {}).get(
                        "name", "")}}
                    out += self._open(key)
                out += self._delta(key, (call.get("function") or {}).get("arguments") or "")
        return out

    def end(self, capture: Capture) -> bytes:
        """Close the open item and finish with the whole Response: the items as streamed, usage
        and status from the capture."""
        out = self._close()
        if not any(item["type"] in ("message", "function_call") for item in self.output):
            out += self._open(("message", 0)) + self._close()  # an empty answer is an empty message, as when whole
        final = {**response_object(self.request, capture, self.ids, self.created_at), "output": self.output}
        return out + self._event(f"response.{final['status']}", response=final)

    def error(self, body: dict[str, Any]) -> bytes:
        """An `error` event for a stream that broke; its `error` field makes the OpenAI SDK raise."""
        error = body["error"]
        return self._event("error", code=error.get("code"), message=error["message"], param=None, error=error)

    def _event(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\n".encode() + b"data: " + orjson.dumps(event) + b"\n\n"

    def _delta(self, key: tuple[str, int], piece: str) -> bytes:
        out = b""
        if self.open != key:
            out += self._close() + self._open(key)
        self.text.append(piece)
        where = {"item_id": self.ids.item(*key), "output_index": len(self.output)}
        if key[0] == "message":
            return out + self._event("response.output_text.delta", **where, content_index=0, delta=piece, logprobs=[])
        if key[0] == "reasoning":
            return out + self._event("response.reasoning_text.delta", **where, content_index=0, delta=piece)
        return out + (self._event("response.function_call_arguments.delta", **where, delta=piece) if piece else b"")

    def _open(self, key: tuple[str, int]) -> bytes:
        self.open, self.text = key, []
        kind, item_id, index = key[0], self.ids.item(*key), len(self.output)
        if kind == "message":
            item = _message_item(item_id, "", "in_progress")
            return (self._event("response.output_item.added", output_index=index, item=item)
                    + self._event("response.content_part.added", item_id=item_id, output_index=index,
                                  content_index=0, part=_text_part("")))
        if kind == "reasoning":
            return self._event("response.output_item.added", output_index=index,
                               item={"type": "reasoning", "id": item_id, "summary": [], "content": []})
        return self._event("response.output_item.added", output_index=index,
                           item=_function_call_item(item_id, self.call, "in_progress"))

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        kind, item_id, index, text = self.open[0], self.ids.item(*self.open), len(self.output), "".join(self.text)
        where = {"item_id": item_id, "output_index": index}
        if kind == "message":
            item = _message_item(item_id, text, "completed")
            out = (self._event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
                   + self._event("response.content_part.done", **where, content_index=0, part=_text_part(text)))
        elif kind == "reasoning":
            item = _reasoning_item(item_id, text)
            out = self._event("response.reasoning_text.done", **where, content_index=0, text=text)
        else:
            item = _function_call_item(item_id, {**self.call, "function": {**self.call["function"], "arguments": text}},
                                       "completed")
            out = self._event("response.function_call_arguments.done", **where, name=item["name"], arguments=text)
        self.output.append(item)
        self.open = None
        return out + self._event("response.output_item.done", output_index=index, item=item)
