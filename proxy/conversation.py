"""A recorded call as chat messages: what was sent, what came back. Pure functions over the
`calls.request` and `calls.response` JSON, shared by whatever shows or grades a call (the
export, trace content, graders), so every one of them reads a call the same way."""

from __future__ import annotations

import json
from typing import Any

from flywheel.proxy.capture import COMPLETIONS
from flywheel.proxy.responses import RESPONSES, chat_request


def chat_body(endpoint: str, request: dict[str, Any]) -> dict[str, Any]:
    """The request as a chat completion body: a chat request as it is, a completions `prompt`
    as one user message (its JSON text when it is not a string), a Responses request as the
    proxy sent it upstream."""
    if endpoint == RESPONSES:
        return chat_request(request)
    if endpoint == COMPLETIONS:
        prompt = request.get("prompt")
        return {**request, "messages": [{"role": "user", "content": prompt if isinstance(prompt, str)
                                         else json.dumps(prompt)}]}
    return request


def prompt_messages(endpoint: str, request: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages the call sent."""
    return chat_body(endpoint, request).get("messages") or []


def completion_messages(response: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Choice 0 of the recorded response as a list of one assistant message ([] without one)."""
    choices = (response or {}).get("choices") or []
    if not choices:
        return []
    if "message" in choices[0]:
        return [choices[0]["message"]]
    return [{"role": "assistant", "content": choices[0].get("text")}]
