"""Rewards without posted feedback: a grader scores closed episodes (`[grader]`).

With `kind = "endpoint"`, the proxy sends closed episodes (those nobody rewarded, or all of
them) to the team's own grading service and records each score as feedback, with
`source = "endpoint:NAME"` and the grader's `version`; `kind = "judge"` scores them with the
built-in LLM judge (proxy/judge.py, `source = "judge:MODEL"`) through the same contract:

    POST {url}  {"rubric": str | null, "items": [{"id", "episode_id", "task", "metadata",
                  "target_call": call_id | null, "calls": [{"call_id", "agent", "messages", "completion"}]}]}
    ->          {"scores": [number, ...]}   one finite score per item, in order

The episodes of one task go in one request (one item each), so a grader can compare them;
an episode without a task goes alone. A request that fails (no answer in `timeout_s`, a
status other than 200, the wrong number of scores, a score that is not a finite number) is
retried `attempts` times with doubling back-off; then its episodes are marked
`grade_failed_at` / `grade_error` (SQL, `flywheel status`) and left alone: never scored 0.
`flywheel grade` re-grades stored episodes, also failed ones, under a new `version`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Literal, Protocol, Sequence

import aiohttp

from flywheel.proxy.agreement import Agreement, agreement
from flywheel.proxy.attribution import new_id
from flywheel.proxy.conversation import completion_messages, prompt_messages
from flywheel.store.records import Feedback, GradeFailed
from flywheel.store.writer import BatchWriter

log = logging.getLogger("flywheel.proxy.grader")


@dataclass(frozen=True)
class GraderConfig:
    """`[grader]`: where rewards come from besides the feedback clients post."""

    # "feedback": posted feedback only; "endpoint": also your grading service at `url`;
    # "judge": also an LLM judge (proxy/judge.py) that compares the episodes of a task
    kind: Literal["feedback", "endpoint", "judge"] = "feedback"
    # the grading service (POST, the contract in proxy/grader.py)
    url: str = ""
    # recorded as feedback.source = "endpoint:NAME" (the judge's is "judge:MODEL")
    name: str = "grader"
    # recorded as feedback.grader_version; a new version re-grades with `flywheel grade`
    version: str = "1"
    # sent with every request: what a good episode is (your grader may ignore it)
    rubric: str = ""
    # "unrewarded": grade closed episodes nobody posted feedback for; "all": every closed episode
    apply_to: Literal["unrewarded", "all"] = "unrewarded"
    # grade an episode this many seconds after it closed (late feedback gets there first)
    wait_s: float = 30.0
    # with apply_to = "all" and posted feedback, the episode's reward is
    # feedback_weight * feedback + (1 - feedback_weight) * grade
    feedback_weight: float = 0.5
    # environment variable holding a key for the service or the judge's endpoint (Authorization: Bearer)
    api_key_env: str = ""
    # the judge's OpenAI-compatible /v1 URL ("" = the proxy's upstream) and model ("" = the base model)
    judge_url: str = ""
    judge_model: str = ""
    # most episodes per judge prompt, and most characters of episodes in one: a larger group is split
    judge_max_items: int = 8
    judge_max_chars: int = 12_000
    # tokens the judge may write (a reason and a score per episode)
    judge_max_tokens: int = 1024
    # one request's time limit, seconds
    timeout_s: float = 60.0
    # tries per request before its episodes are marked grade_failed
    attempts: int = 4
    # wait before the first retry, seconds; doubled after each
    backoff_s: float = 1.0
    # episodes read per look; seconds between looks when there was nothing to grade
    batch: int = 64
    poll_s: float = 2.0
    # shadow samples (proxy/shadow.py): K more completions of each call of `shadow_agents` in an
    # episode without a task id, graded with it as one group (0 = off; needs kind endpoint or judge)
    shadow_samples: int = 0
    # the agents whose calls are resampled: a regex matched against the whole name; set it to
    # [learner] train_agents, since only trained calls gain from it
    shadow_agents: str = ".*"
    # most shadow requests (each brings all K samples of one call) sent upstream per second
    shadow_budget: float = 1.0
    # no shadow request goes out while this many client calls are in flight upstream
    shadow_busy: int = 8
    # a call still waiting for its shadows this many seconds after its answer is not resampled
    shadow_max_wait_s: float = 60.0
    # calls waiting for shadows at most; more are not resampled
    shadow_queue: int = 1000
    # vLLM request priority of shadow requests (lower runs first; clients' are 0; 0 = not sent)
    shadow_priority: int = 10
    # tokens a shadow may sample when the original request set no limit
    shadow_max_tokens: int = 1024


class GradeError(RuntimeError):
    """The grader's answer cannot be used (status, shape, count, a score that is not finite)."""


def task_groups(episodes: Sequence[dict]) -> list[list[dict]]:
    """The episodes of each task together, in order of first appearance; one without a task alone."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for episode in episodes:
        groups[episode["task_id"] or f"\0{episode['episode_id']}"].append(episode)
    return list(groups.values())


def grading_item(episode: dict, calls: Sequence[dict] | None = None, target_call: str | None = None) -> dict[str, Any]:
    """One episode as the contract's item: its client calls (or `calls`) as the chat messages
    sent and the answer returned; with `target_call` (a comparison group's member), named by it."""
    items = []
    for call in calls if calls is not None else [c for c in episode["calls"] if not c.get("shadow_of")]:
        request = json.loads(call["request"])
        response = json.loads(call["response"]) if call["response"] else None
        completion = completion_messages(response)
        items.append({"call_id": call["call_id"], "agent": call["agent"],
                      "messages": prompt_messages(call["endpoint"], request),
                      "completion": completion[0] if completion else None})
    metadata = episode["metadata"]
    return {"id": target_call or episode["episode_id"], "episode_id": episode["episode_id"],
            "task": episode["task_id"], "metadata": json.loads(metadata) if isinstance(metadata, str) else metadata,
            "target_call": target_call, "calls": items}


def comparison_groups(episode: dict) -> list[list[dict]]:
    """For each call with shadow samples, the items of its comparison group: the episode up to
    and including the call, then once with each shadow in its place; `target_call` names it."""
    client = [c for c in episode["calls"] if not c.get("shadow_of")]
    shadows: dict[str, list[dict]] = defaultdict(list)
    for call in episode["calls"]:
        if call.get("shadow_of"):
            shadows[call["shadow_of"]].append(call)
    groups = []
    for position, call in enumerate(client):
        if call["call_id"] in shadows:
            before = client[:position]
            groups.append([grading_item(episode, before + [member], member["call_id"])
                           for member in [call, *shadows[call["call_id"]]]])
    return groups


def parse_scores(body: Any, count: int) -> list[float]:
    """The `scores` of a grader's reply, checked: `count` finite numbers; GradeError otherwise."""
    scores = body.get("scores") if isinstance(body, dict) else None
    if not isinstance(scores, list):
        raise GradeError(f"the reply has no 'scores' list: {str(body)[:200]}")
    if len(scores) != count:
        raise GradeError(f"{len(scores)} scores for {count} items")
    for score in scores:
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise GradeError(f"score {score!r} is not a finite number")
    return [float(score) for score in scores]


def mixed_reward(grade: float, feedback: float | None, feedback_weight: float) -> float:
    """The episode's reward: the grade alone, or w * feedback + (1 - w) * grade when both exist."""
    return grade if feedback is None else feedback_weight * feedback + (1 - feedback_weight) * grade


@dataclass
class GradeCounts:
    graded: int = 0
    failed: int = 0
    last_error: str = ""


class Scorer(Protocol):
    """Scores contract items (one per episode, in order); raises GradeError for an answer it cannot use."""

    source: str  # recorded as feedback.source

    async def __call__(self, rubric: str | None, items: list[dict]) -> list[float]: ...


class EndpointScorer:
    """The team's grading service: the contract's request, its `scores` checked."""

    def __init__(self, config: GraderConfig, session: aiohttp.ClientSession):
        self.url = config.url
        self.session = session
        self.source = f"endpoint:{config.name}"

    async def __call__(self, rubric: str | None, items: list[dict]) -> list[float]:
        async with self.session.post(self.url, json={"rubric": rubric, "items": items}) as response:
            text = await response.text()
        if response.status != 200:
            raise GradeError(f"{self.url} answered {response.status}: {text[:300]}")
        try:
            reply = json.loads(text)
        except json.JSONDecodeError:
            raise GradeError(f"the reply is not JSON: {text[:200]}") from None
        return parse_scores(reply, len(items))


def http_session(config: GraderConfig, default_key: str = "") -> aiohttp.ClientSession:
    """The session a scorer talks through: the key from `api_key_env` (else `default_key`), the time limit."""
    key = os.environ.get(config.api_key_env, "") if config.api_key_env else default_key
    return aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"} if key else None,
                                 timeout=aiohttp.ClientTimeout(total=config.timeout_s))


class Grader:
    """Scores closed episodes with a `Scorer`, in the background and on demand."""

    def __init__(self, config: GraderConfig, writer: BatchWriter, scorer: Scorer,
                 busy: Callable[[], list[str]] = list):
        self.config = config
        self.busy = busy  # episodes whose shadow samples are still to come: graded once they are in
        self.writer = writer
        self.scorer = scorer
        self.source = scorer.source
        self.counts = GradeCounts()
        self.passing = asyncio.Lock()
        self.grading: set[str] = set()  # episodes whose grades are being written: the feed waits for all of them
    async def run(self) -> None:
        """Grade what is due, forever, pausing `poll_s` whenever nothing was; a failing store or
        service never ends the loop."""
        done = 0
        while True:
            if not done:
                await asyncio.sleep(self.config.poll_s)
            try:
                done = await self.grade_due(self.config.version)
            except Exception:  # the store's errors: logged, tried again after the pause
                log.exception("grading pass failed")
                done = 0

    async def grade_due(self, version: str, since: datetime | None = None, failed_before: datetime | None = None,
                        wait_s: float | None = None) -> int:
        """One batch of due episodes graded under `version`; how many were tried. Episodes the
        grader gave up on are tried again only if that was before `failed_before`. One pass at
        a time (the background one and `flywheel grade`'s), so no episode is graded twice."""
        config = self.config
        async with self.passing:
            episodes = await self.writer.read(
                self.writer.store.episodes_to_grade, self.source, version, config.apply_to == "unrewarded",
                config.wait_s if wait_s is None else wait_s, since, failed_before, config.batch, self.busy())
            for group in task_groups(episodes):
                await self.grade_group(group, version)
        return len(episodes)

    async def regrade(self, version: str, since: datetime | None) -> GradeCounts:
        """Every closed episode (since `since`) not yet scored under `version`, failed ones too,
        each tried once: what `flywheel grade` runs."""
        started, before = datetime.now(timezone.utc), (self.counts.graded, self.counts.failed)
        while await self.grade_due(version, since, failed_before=started, wait_s=0):
            pass
        return GradeCounts(self.counts.graded - before[0], self.counts.failed - before[1], self.counts.last_error)

    async def grade_group(self, group: list[dict], version: str) -> None:
        """The group's episodes in one request (those still to be scored: all, with apply_to =
        "all"), then each comparison group of their shadow samples in one; every score is
        recorded, or, when any request failed, every episode is marked grade_failed."""
        episodes = [e for e in group if self.config.apply_to == "all" or e["feedback_reward"] is None]
        requests = [[grading_item(e) for e in episodes]] if episodes else []
        requests += [items for e in group for items in comparison_groups(e)]
        try:
            scores = [await self._scores(items) for items in requests]
        except GradeError as failure:
            now, error = datetime.now(timezone.utc), str(failure)
            for episode in group:
                await self.writer.submit(GradeFailed(episode["episode_id"], now, error))
            self.counts.failed += len(group)
            self.counts.last_error = error
            log.warning("grading %d episode(s) failed: %s", len(group), error)
            return
        now = datetime.now(timezone.utc)
        posted = {e["episode_id"]: e["feedback_reward"] for e in group}
        self.grading.update(posted)
        try:
            for item, score in zip((item for items in requests for item in items), (s for ss in scores for s in ss)):
                episode_id, call_id = item["episode_id"], item["target_call"]
                reward = score if call_id else mixed_reward(score, posted[episode_id], self.config.feedback_weight)
                dims = {"grade": score, **({"feedback": posted[episode_id]}
                                           if posted[episode_id] is not None and not call_id else {})}
                await self.writer.submit(Feedback(
                    feedback_id=new_id("fb"), episode_id=episode_id, call_id=call_id, created_at=now, reward=reward,
                    dims=json.dumps(dims), source=self.source, grader_version=version))
        finally:
            self.grading.difference_update(posted)
        self.counts.graded += len(group)

    async def _scores(self, items: list[dict]) -> list[float]:
        """The scorer's scores, retried with doubling back-off; GradeError once every attempt failed."""
        delay, error = self.config.backoff_s, ""
        for attempt in range(self.config.attempts):
            if attempt:
                await asyncio.sleep(delay)
                delay *= 2
            try:
                return await self.scorer(self.config.rubric or None, items)
            except (aiohttp.ClientError, asyncio.TimeoutError) as unreachable:
                error = f"unreachable: {type(unreachable).__name__}: {unreachable}"
            except GradeError as bad:
                error = str(bad)
        raise GradeError(f"after {self.config.attempts} attempt(s): {error}")

    async def calibrate(self, labels: dict[str, float]) -> tuple[Agreement, int]:
        """Score labelled stored episodes (nothing is recorded) and compare, within task groups;
        also how many episodes the grader could not score (their groups are left out)."""
        episodes = await self.writer.read(self.writer.store.episodes_with_calls, list(labels), self.source)
        groups, unscored = [], 0
        for group in task_groups(episodes):
            try:
                scores = await self._scores([grading_item(e) for e in group])
            except GradeError as failure:
                unscored += len(group)
                self.counts.last_error = str(failure)
                continue
            groups.append([(score, labels[e["episode_id"]]) for e, score in zip(group, scores)])
        return agreement(groups), unscored

    def health(self) -> dict[str, Any]:
        return {"source": self.source, "version": self.config.version, "graded": self.counts.graded,
                "failed": self.counts.failed, "last_error": self.counts.last_error}
