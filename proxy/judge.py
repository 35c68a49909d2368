"""The built-in LLM judge (`[grader] kind = "judge"`), RULER-style.

One prompt holds the rubric and a group of episodes (the attempts at one task), and the
judge answers with a short reason and a score in [0, 1] for each, relative to the others:
comparing attempts is easier for a model than grading one in isolation (OpenPipe's RULER).
It calls any OpenAI-compatible endpoint (`judge_url`, default the proxy's upstream;
`judge_model`, default the base model), asks for JSON through `response_format` (vLLM's
guided decoding) and falls back to plain text when the endpoint refuses it, read by a
tolerant parser. A group larger than `judge_max_items` episodes or `judge_max_chars`
characters is split. Every judge call is recorded in `calls` under the agent
`flywheel-judge`, in an episode of its own that is never rewarded, so never trained.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone
from typing import Any, Sequence

import aiohttp

from flywheel.proxy.attribution import new_id
from flywheel.proxy.capture import CHAT, Capture
from flywheel.proxy.errors import MAX_ERROR_CHARS
from flywheel.proxy.grader import GradeError, GraderConfig
from flywheel.store.records import CallRecord, EpisodeOpen
from flywheel.store.writer import BatchWriter

JUDGE_AGENT = "flywheel-judge"

DEFAULT_RUBRIC = """\
- An episode that reaches the user's goal scores higher than one that does not.
- Among those that reach it, prefer the more correct, complete and concise one.
- A wrong answer stated confidently scores lower than an honest partial one.
- Scores are relative: spread them over [0, 1] when the episodes differ; give equal scores
  only to episodes of equal quality."""

_INSTRUCTIONS = """\
You grade attempts of AI agents at the same task. Read every episode, then score each in [0, 1] by this rubric:
{rubric}

Answer with JSON only: {{"scores": [{{"id": "<episode id>", "reason": "<one sentence>", "score": <0 to 1>}}, ...]}},
one entry per episode, in the order given."""

def judge_schema(ids: Sequence[str]) -> dict:
    """The answer's JSON schema: one entry per episode, ids from the group, so guided decoding
    cannot miss one or invent one."""
    return {"type": "object", "required": ["scores"], "additionalProperties": False, "properties": {"scores": {
        "type": "array", "minItems": len(ids), "maxItems": len(ids), "items": {
            "type": "object", "required": ["id", "reason", "score"], "additionalProperties": False, "properties": {
                "id": {"type": "string", "enum": list(ids)}, "reason": {"type": "string", "maxLength": 200},
                "score": {"type": "number", "minimum": 0, "maximum": 1}}}}}}


def _content(message: dict | None) -> str:
    content = (message or {}).get("content")
    text = content if isinstance(content, str) else json.dumps(content) if content else ""
    calls = (message or {}).get("tool_calls")
    return text + (f" [tool calls: {json.dumps(calls)}]" if calls else "")


def render_episode(item: dict) -> str:
    """An episode as the judge reads it: each call's last message in and its answer out; a
    comparison group's member (`target_call`) is the episode only up to the answer compared."""
    lines = [f"## Episode {item['id']}"]
    if item.get("target_call"):
        lines.append("(the episode so far: score how well its last answer serves the goal)")
    for call in item["calls"]:
        asked = call["messages"][-1] if call["messages"] else None
        lines.append(f"[{call['agent']}] {(asked or {}).get('role', 'user')}: {_content(asked)}")
        lines.append(f"[{call['agent']}] assistant: {_content(call['completion'])}")
    return "\n".join(lines)


def chunks(items: Sequence[dict], max_items: int, max_chars: int) -> list[list[dict]]:
    """Consecutive pieces of the group, each at most `max_items` episodes and `max_chars`
    characters as rendered (an episode longer than that alone goes alone)."""
    pieces: list[list[dict]] = []
    size = 0
    for item in items:
        length = len(render_episode(item))
        if not pieces or len(pieces[-1]) >= max_items or size + length > max_chars:
            pieces.append([])
            size = 0
        pieces[-1].append(item)
        size += length
    return pieces


def judge_messages(rubric: str | None, items: Sequence[dict]) -> list[dict]:
    episodes = "\n\n".join(render_episode(item) for item in items)
    return [{"role": "system", "content": _INSTRUCTIONS.format(rubric=rubric or DEFAULT_RUBRIC)},
            {"role": "user", "content": f"{len(items)} episodes:\n\n{episodes}"}]


_SCORE = re.compile(r'"score"\s*:\s*(-?\d+(?:\.\d+)?)')


def parse_judgement(text: str, ids: Sequence[str]) -> list[float]:
    """Scores in the order of `ids`, from the judge's answer: its JSON (entries matched by id,
    else by position), else the `"score": x` numbers in order. Scores are clipped to [0, 1].
    GradeError when it holds no score for every episode."""
    scores = _json_scores(text, ids)
    if len(scores) != len(ids):
        scores = [float(s) for s in _SCORE.findall(text)]
    if len(scores) != len(ids):
        raise GradeError(f"the judge scored {len(scores)} of {len(ids)} episodes: {text[:300]!r}")
    return [min(1.0, max(0.0, s)) for s in scores]


def _json_scores(text: str, ids: Sequence[str]) -> list[float]:
    """The scores of the JSON object in `text`, by id when every id is there, else in order ([] without one)."""
    try:
        entries = json.loads(text[text.find("{"):text.rfind("}") + 1])["scores"]
        by_id = {str(e["id"]): e["score"] for e in entries if isinstance(e, dict) and "id" in e}
        scores = [by_id[i] for i in ids] if all(i in by_id for i in ids) else [
            e.get("score") if isinstance(e, dict) else e for e in entries]
    except (ValueError, KeyError, TypeError, AttributeError):
        return []
    valid = all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)
    return [float(s) for s in scores] if valid else []


class JudgeScorer:
    """Scores contract items with an LLM over an OpenAI-compatible endpoint; records each call."""

    def __init__(self, config: GraderConfig, session: aiohttp.ClientSession, base_url: str, model: str,
                 writer: BatchWriter):
        self.config = config
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.writer = writer
        self.source = f"judge:{model}"
        self.structured = True  # until the endpoint refuses response_format

    async def __call__(self, rubric: str | None, items: list[dict]) -> list[float]:
        scores: list[float] = []
        for piece in chunks(items, self.config.judge_max_items, self.config.judge_max_chars):
            scores += await self._judge(rubric, piece)
        return scores

    async def _judge(self, rubric: str | None, items: list[dict]) -> list[float]:
        body: dict[str, Any] = {"model": self.model, "messages": judge_messages(rubric, items), "temperature": 0.0,
                                "max_tokens": self.config.judge_max_tokens, "return_token_ids": True,
                                "logprobs": True}
        if self.structured:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "judgement", "schema": judge_schema([item["id"] for item in items])}}
        started, created_at = time.perf_counter(), datetime.now(timezone.utc)
        async with self.session.post(f"{self.base_url}/chat/completions", json=body) as response:
            status, text = response.status, await response.text()
        if status == 400 and self.structured and "response_format" in text:
            self.structured = False  # an endpoint without guided decoding: plain text, parsed tolerantly
            return await self._judge(rubric, items)
        await self._record(body, status, text, created_at, started, [item["episode_id"] for item in items])
        if status != 200:
            raise GradeError(f"the judge at {self.base_url} answered {status}: {text[:300]}")
        try:
            answer = json.loads(text)["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise GradeError(f"the judge's reply is not a chat completion: {text[:200]}") from None
        return parse_judgement(answer, [item["id"] for item in items])

    async def _record(self, body: dict, status: int, text: str, created_at: datetime, started: float,
                      judged: list[str]) -> None:
        """The judge's call in `calls`, agent flywheel-judge, in an episode naming what it judged."""
        episode = new_id("judge")
        await self.writer.put(EpisodeOpen(episode, created_at, agent=JUDGE_AGENT,
                                          metadata=json.dumps({"flywheel": "judge", "judged": judged})))
        capture = Capture(CHAT)
        try:
            data = json.loads(text) if status == 200 else None
        except ValueError:
            data = None
        if isinstance(data, dict):
            capture.add(data)
        await self.writer.put(CallRecord(
            call_id=new_id("call"), episode_id=episode, agent=JUDGE_AGENT, created_at=created_at, endpoint=CHAT,
            stream=False, model=self.model, adapter=capture.model, request=json.dumps(body),
            response=json.dumps(capture.response_json()) if capture.choices else None,
            prompt_token_ids=capture.prompt_token_ids, completion_token_ids=capture.completion_token_ids(),
            completion_logprobs=capture.completion_logprobs(), finish_reason=capture.first.finish_reason,
            prompt_tokens=capture.prompt_tokens(), completion_tokens=capture.completion_tokens(),
            latency_ms=(time.perf_counter() - started) * 1000, ttft_ms=None, status=status,
            error=None if status == 200 else text[:MAX_ERROR_CHARS], temperature=0.0))
