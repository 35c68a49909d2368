"""Shadow samples: comparison groups for one-off traffic (`[grader] shadow_samples = K`).

GRPO learns from several attempts at one prompt; production traffic seldom repeats one. So
after a client has its answer, the proxy asks the upstream for K more completions of the
call's exact prompt token ids (`/v1/completions` with the token ids as the prompt, `n = K`),
from the adapter version that served it, with the same sampling settings. Each lands in
`calls` with `shadow_of` = the original's id (same episode, agent and seq; `request` is the
original's). No client sees one and no tool runs on one. The grader then scores the original
and its shadows as one group (proxy/grader.py) and the learner centres the call's advantage
on that group (learner/advantages.py).

Which calls: those of `shadow_agents` in episodes without a task id (a task's attempts form
their own groups) that are not evaluation episodes, answered 200 with token ids, sampled (not
greedy), with one choice and no forced tool call. A shadow of a call with tools is the raw
text the model wrote (vLLM's tool-call parser runs on chat answers only).

Bounded, and behind the clients:
- at most `shadow_budget` upstream requests a second (one request brings all K);
- none goes out while client calls in flight upstream number `shadow_busy` or more;
- the newest call goes first (under overload the freshest, most on-policy calls are the
  ones resampled, rather than every call late); a call that waited `shadow_max_wait_s` is
  dropped, and so is the oldest when `shadow_queue` calls wait (both counted in
  `flywheel_shadow_samples_total`);
- each asks for vLLM's `priority = shadow_priority` (clients' are 0; lower runs first), which
  vLLM honours under `--scheduling-policy priority` (`flywheel vllm` starts it so). An
  upstream that refuses the field gets the requests without it from then on.
The adapter version a queued call names stays loaded until its shadows are done or dropped.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import orjson

from flywheel.proxy.attribution import new_id
from flywheel.proxy.capture import COMPLETIONS, Capture, upstream_body
from flywheel.proxy.errors import MAX_ERROR_CHARS
from flywheel.proxy.sampling import Sampling
from flywheel.proxy.replicas import Replicas
from flywheel.proxy.upstream import UpstreamError
from flywheel.store.records import CallRecord
from flywheel.store.writer import BatchWriter

if TYPE_CHECKING:
    from flywheel.proxy.grader import GraderConfig
    from flywheel.proxy.metrics import Metrics
    from flywheel.proxy.registry import Registry, Version

log = logging.getLogger("flywheel.proxy.shadow")

# what constrains the output, copied from the original request; never its `seed` (K copies of one sample)
_CONSTRAINTS = ("stop", "stop_token_ids", "min_tokens", "ignore_eos", "response_format", "structured_outputs",
                "logit_bias", "bad_words", "allowed_token_ids")
_MOST_AT_ONCE = 16  # shadow requests in flight at once, whatever the budget, should the upstream slow down


@dataclass(frozen=True)
class ShadowJob:
    """A client call to resample, as the proxy saw it answered."""

    call_id: str
    episode_id: str
    agent: str
    endpoint: str  # the client's: the shadows' `response` takes its shape
    request_json: str
    client_model: str | None
    served_model: str  # what vLLM served it with (an adapter's name, or the base model)
    prompt_ids: tuple[int, ...]
    body: dict  # the /v1/completions request, but for `priority`
    sampling: Sampling
    version: "Version | None"  # held loaded until the job ends
    queued_at: float  # time.monotonic()


def shadow_request(prompt_ids: list[int], model: str, forward: dict, sampling: Sampling, samples: int,
                   default_max_tokens: int) -> dict:
    """The /v1/completions body for `samples` more completions of these prompt tokens: the
    original's sampling settings and output constraints, its token limit (else the default)."""
    body = {name: forward[name] for name in _CONSTRAINTS if forward.get(name) is not None}
    body.update({**asdict(sampling), "model": model, "prompt": prompt_ids, "n": samples,
                 "max_tokens": forward.get("max_completion_tokens") or forward.get("max_tokens")
                 or default_max_tokens})
    del body["choices"]
    return upstream_body(body, COMPLETIONS)[0]


def shadow_records(job: ShadowJob, capture: Capture, seq: int, latency_ms: float) -> list[CallRecord]:
    """One `calls` row per sampled choice, shaped like the original's."""
    now = datetime.now(timezone.utc)
    records = []
    for index in sorted(capture.choices):
        choice = capture.choices[index]
        text = "".join(choice.text)
        output = {"index": 0, "finish_reason": choice.finish_reason,
                  **({"text": text} if job.endpoint == COMPLETIONS else
                     {"message": {"role": "assistant", "content": text}})}
        records.append(CallRecord(
            call_id=new_id("call"), episode_id=job.episode_id, agent=job.agent, created_at=now,
            endpoint=job.endpoint, stream=False, model=job.client_model, adapter=capture.model or job.served_model,
            request=job.request_json, response=orjson.dumps({"id": capture.response_id, "choices": [output]}).decode(),
            prompt_token_ids=list(job.prompt_ids), completion_token_ids=list(choice.token_ids),
            completion_logprobs=list(choice.logprobs) or None, finish_reason=choice.finish_reason,
            prompt_tokens=len(job.prompt_ids), completion_tokens=len(choice.token_ids), latency_ms=latency_ms,
            ttft_ms=None, status=200, error=None, **asdict(replace(job.sampling, choices=1)),
            shadow_of=job.call_id, seq=seq))
    return records


class ShadowSampler:
    """Takes answered client calls (`offer`, on the hot path: no I/O) and samples their shadows
    in the background (`run`), within the budget."""

    def __init__(self, config: "GraderConfig", writer: BatchWriter, upstream: Replicas, headers: dict[str, str],
                 registry: "Registry", metrics: "Metrics", timeout_s: float):
        self.config = config
        self.writer = writer
        self.upstream = upstream
        self.headers = headers
        self.registry = registry
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.agents = re.compile(config.shadow_agents)
        self.queue: deque[ShadowJob] = deque()
        self.pending: Counter[str] = Counter()  # episode id -> its calls queued or being resampled
        self.in_flight = 0
        self.priority = config.shadow_priority
        self.counts: Counter[str] = Counter()
        self._queued = asyncio.Event()
        self._slots = asyncio.Semaphore(_MOST_AT_ONCE)
        self._tasks: set[asyncio.Task] = set()

    def busy_episodes(self) -> list[str]:
        """Episodes whose shadows are still to come: the grader and the feed leave them for later."""
        return list(self.pending)

    def offer(self, *, call_id: str, episode_id: str, agent: str, task_id: str | None, endpoint: str,
              request_json: str, client_model: str | None, capture: Capture, forward: dict, sampling: Sampling,
              version: "Version | None") -> None:
        """Queue an answered call for resampling, if it is one to resample (see the module's doc)."""
        token_ids = capture.completion_token_ids()
        if (task_id or not self.agents.fullmatch(agent) or not capture.prompt_token_ids or not token_ids
                or sampling.temperature < 1e-5 or sampling.choices != 1):
            return
        if forward.get("tool_choice") not in (None, "auto", "none"):
            # vLLM constrains a required or named tool call by guided decoding, which a plain
            # completion of the same tokens would not repeat: its shadows would come from elsewhere
            self._count("skipped_forced_tool")
            return
        if len(self.queue) >= self.config.shadow_queue:
            self._count("dropped_queue_full")
            self._finish(self.queue.popleft())
        served = capture.model or forward.get("model") or ""
        body = shadow_request(list(capture.prompt_token_ids), served, forward, sampling, self.config.shadow_samples,
                              self.config.shadow_max_tokens)
        if version is not None:
            self.registry.hold(version)
        self.queue.append(ShadowJob(call_id, episode_id, agent, endpoint, request_json, client_model, served,
                                    tuple(capture.prompt_token_ids), body, sampling, version, time.monotonic()))
        self.pending[episode_id] += 1
        self._queued.set()

    async def run(self) -> None:
        """Forever: the newest queued call, checked against the store, paced, sent when the
        upstream is quiet; a failure is counted and logged, never the loop's end."""
        next_send = 0.0
        try:
            while True:
                job = await self._next()
                try:
                    seq = await self._stored_seq(job)
                    if seq is None:
                        self._finish(job)
                        continue
                    await asyncio.sleep(max(0.0, next_send - time.monotonic()))
                    if not await self._quiet(job):
                        self._count("dropped_waited")
                        self._finish(job)
                        continue
                    next_send = time.monotonic() + 1 / self.config.shadow_budget
                    await self._slots.acquire()
                except asyncio.CancelledError:
                    self._finish(job)
                    raise
                except Exception:  # the store's errors: this call is not resampled, the next ones are
                    log.exception("shadow samples of %s: cannot prepare them", job.call_id)
                    self._count("failed")
                    self._finish(job)
                    continue
                task = asyncio.get_running_loop().create_task(self._sample(job, seq))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # each releases what its job held
            while self.queue:
                self._finish(self.queue.popleft())

    async def _next(self) -> ShadowJob:
        """The newest queued call, once there is one that has not waited too long."""
        self._expire()
        while not self.queue:
            self._queued.clear()
            await self._queued.wait()
            self._expire()
        return self.queue.pop()

    def _expire(self) -> None:
        """Drop (and count) the calls that have waited `shadow_max_wait_s`: the oldest are first."""
        while self.queue and self._waited_too_long(self.queue[0]):
            self._count("dropped_waited")
            self._finish(self.queue.popleft())

    def _waited_too_long(self, job: ShadowJob) -> bool:
        return time.monotonic() - job.queued_at > self.config.shadow_max_wait_s

    async def _stored_seq(self, job: ShadowJob) -> int | None:
        """The original's seq, once it is committed; None (counted) when it is not to be resampled
        after all: its episode got a task id or is an evaluation episode, or it was never stored."""
        await self.writer.flush(self.timeout_s)
        origin = await self.writer.read(self.writer.store.shadow_origin, job.call_id)
        if origin is None or origin["task_id"] is not None or origin["eval"]:
            self._count("not_stored" if origin is None else "skipped_eval" if origin["eval"] else "skipped_task")
            return None
        return origin["seq"]

    async def _quiet(self, job: ShadowJob) -> bool:
        """Wait until fewer than `shadow_busy` client calls are in flight upstream; False once
        the job has waited `shadow_max_wait_s` since it was queued."""
        while self.upstream.in_progress - self.in_flight >= self.config.shadow_busy:
            if self._waited_too_long(job):
                return False
            self._expire()
            await asyncio.sleep(0.05)
        return not self._waited_too_long(job)

    async def _sample(self, job: ShadowJob, seq: int) -> None:
        started = time.perf_counter()
        try:
            capture = await self._ask(job)
            if capture is not None:
                for record in shadow_records(job, capture, seq, (time.perf_counter() - started) * 1000):
                    await self.writer.put(record)
                # committed before the episode stops being busy, so the grader finds every shadow
                while not await self.writer.flush(self.timeout_s):
                    log.warning("shadow samples of %s: the store has not committed them yet", job.call_id)
                self._count("sampled")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("shadow samples of %s failed", job.call_id)
            self._count("failed")
        finally:
            self._slots.release()
            self._finish(job)

    async def _ask(self, job: ShadowJob) -> Capture | None:
        """The upstream's completions, captured; None (counted, logged) when it did not give them."""
        body = dict(job.body, **({"priority": self.priority} if self.priority else {}))
        self.in_flight += 1  # counted apart from the clients' calls upstream (`_quiet`)
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await self.upstream.post(job.episode_id, "/completions", orjson.dumps(body), self.headers)
                try:
                    raw = await response.read()
                finally:
                    self.upstream.abort(response)
        except (UpstreamError, TimeoutError) as failure:
            log.warning("shadow samples of %s: upstream unreachable or slow: %s", job.call_id, failure)
            self._count("failed")
            return None
        finally:
            self.in_flight -= 1
        if response.status == 400 and self.priority and b"priority" in raw.lower():
            log.warning("the upstream refuses request priorities (start vLLM with --scheduling-policy priority): "
                        "shadow samples are sent without one from now on")
            self.priority = 0
            return await self._ask(job)
        if response.status != 200:
            log.warning("shadow samples of %s: upstream answered %d: %s", job.call_id, response.status,
                        raw.decode(errors="replace")[:MAX_ERROR_CHARS])
            self._count("failed")
            return None
        capture = Capture(COMPLETIONS)
        capture.add(orjson.loads(raw))
        return capture

    def _finish(self, job: ShadowJob) -> None:
        if job.version is not None:
            self.registry.release(job.version)
        self.pending[job.episode_id] -= 1
        if self.pending[job.episode_id] <= 0:
            del self.pending[job.episode_id]

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        self.metrics.shadows.labels(outcome).inc()

    def health(self) -> dict:
        return {"samples": self.config.shadow_samples, "queued": len(self.queue), "in_flight": self.in_flight,
                "priority": self.priority, **self.counts}
