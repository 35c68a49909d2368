"""What the proxy asks the upstream for, what it records, and what it hands back.

Pure functions over the JSON of OpenAI-compatible requests and (vLLM) responses. The
proxy always asks for exact token ids (`return_token_ids`) and the sampled tokens'
logprobs; the client gets back only the fields it asked for itself. A whole response
and a stream of chunks go through the same `Capture`, so streamed calls are recorded
exactly like non-streamed ones, token ids assembled from the chunks' deltas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CHAT = "chat.completions"
COMPLETIONS = "completions"


@dataclass(frozen=True)
class Wants:
    """What the client asked for itself, so we strip what only the proxy wanted."""

    token_ids: bool
    logprobs: bool

    @property
    def everything(self) -> bool:
        return self.token_ids and self.logprobs


def upstream_body(body: dict, endpoint: str) -> tuple[dict, Wants]:
    """The body to forward, with token ids and logprobs requested, and what the client wanted."""
    wants = Wants(
        token_ids=bool(body.get("return_token_ids")),
        logprobs=bool(body.get("logprobs")) if endpoint == CHAT else body.get("logprobs") is not None,
    )
    forward = dict(body)
    forward["return_token_ids"] = True
    if not wants.logprobs:
        forward["logprobs"] = True if endpoint == CHAT else 1
    return forward, wants


def strip_unrequested(data: dict, endpoint: str, wants: Wants) -> None:
    """Remove (in place) the token ids and logprobs the client did not ask for."""
    if not wants.token_ids:
        data.pop("prompt_token_ids", None)
    for choice in data.get("choices") or ():
        if not wants.token_ids:
            choice.pop("token_ids", None)
            choice.pop("prompt_token_ids", None)
        if not wants.logprobs and "logprobs" in choice:
            choice["logprobs"] = None


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    role: str | None = None
    tool_calls: dict[int, dict] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Capture:
    """Accumulates a response, whole or chunk by chunk, into what a call records."""

    endpoint: str
    model: str | None = None
    response_id: str | None = None
    prompt_token_ids: list[int] | None = None
    usage: dict | None = None
    choices: dict[int, _Choice] = field(default_factory=dict)
    saw_token_ids: bool = False

    def add(self, data: dict) -> bool:
        """Fold in one response or chunk; True if it carried generated content."""
        self.model = data.get("model") or self.model
        self.response_id = data.get("id") or self.response_id
        if data.get("usage"):
            self.usage = data["usage"]
        if data.get("prompt_token_ids") is not None:
            self.prompt_token_ids = data["prompt_token_ids"]
        content = False
        for raw in data.get("choices") or ():
            choice = self.choices.setdefault(raw.get("index", 0), _Choice())
            content |= self._add_choice(choice, raw)
        return content

    def _add_choice(self, choice: _Choice, raw: dict) -> bool:
        if raw.get("prompt_token_ids") is not None:  # completions put them on the choice
            self.prompt_token_ids = raw["prompt_token_ids"]
        if raw.get("token_ids") is not None:
            self.saw_token_ids = True
            choice.token_ids.extend(raw["token_ids"])
        choice.logprobs.extend(_sampled_logprobs(raw.get("logprobs"), self.endpoint))
        choice.finish_reason = raw.get("finish_reason") or choice.finish_reason
        if self.endpoint == COMPLETIONS:
            text = raw.get("text") or ""
            choice.text.append(text)
            return bool(text or raw.get("token_ids"))
        message = raw.get("message") or raw.get("delta") or {}
        choice.role = message.get("role") or choice.role
        text = message.get("content") or ""
        choice.text.append(text)
        reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
        choice.reasoning.append(reasoning)
        calls = message.get("tool_calls") or ()
        for position, call in enumerate(calls):
            _merge_tool_call(choice.tool_calls, call.get("index", position), call)
        return bool(text or reasoning or calls or raw.get("token_ids"))

    def response_json(self) -> dict:
        """The generated output as recorded in `calls.response`."""
        out = []
        for index in sorted(self.choices):
            c = self.choices[index]
            row: dict[str, Any] = {"index": index, "finish_reason": c.finish_reason}
            if self.endpoint == COMPLETIONS:
                row["text"] = "".join(c.text)
            else:
                row["message"] = {"role": c.role or "assistant", "content": "".join(c.text) or None}
                if any(c.reasoning):
                    row["message"]["reasoning_content"] = "".join(c.reasoning)
                if c.tool_calls:
                    row["message"]["tool_calls"] = [c.tool_calls[i] for i in sorted(c.tool_calls)]
            out.append(row)
        return {"id": self.response_id, "choices": out}

    @property
    def first(self) -> _Choice:
        return self.choices.get(0) or _Choice()

    def completion_token_ids(self) -> list[int] | None:
        return list(self.first.token_ids) if self.saw_token_ids else None

    def completion_logprobs(self) -> list[float] | None:
        return list(self.first.logprobs) if self.first.logprobs else None

    def prompt_tokens(self) -> int | None:
        if self.usage and self.usage.get("prompt_tokens") is not None:
            return self.usage["prompt_tokens"]
        return len(self.prompt_token_ids) if self.prompt_token_ids is not None else None

    def completion_tokens(self) -> int | None:
        if self.usage and self.usage.get("completion_tokens") is not None:
            return self.usage["completion_tokens"]
        if not self.saw_token_ids:
            return None
        return sum(len(c.token_ids) for c in self.choices.values())


def _sampled_logprobs(logprobs: dict | None, endpoint: str) -> list[float]:
    """The sampled tokens' logprobs: chat `content[i].logprob`, completions `token_logprobs`."""
    if not logprobs:
        return []
    if endpoint == CHAT:
        return [entry["logprob"] for entry in logprobs.get("content") or ()]
    return [lp for lp in logprobs.get("token_logprobs") or () if lp is not None]


def _merge_tool_call(calls: dict[int, dict], index: int, delta: dict) -> None:
    """Streamed tool calls arrive as deltas by index: concatenate names and arguments."""
    call = calls.setdefault(index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
    call["id"] = delta.get("id") or call["id"]
    call["type"] = delta.get("type") or call["type"]
    fn = delta.get("function") or {}
    call["function"]["name"] += fn.get("name") or ""
    call["function"]["arguments"] += fn.get("arguments") or ""
