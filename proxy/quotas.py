"""Limits per key and per agent: calls per minute, tokens per minute, calls at once.

Every `[[proxy.keys]]` or `[[proxy.agents]]` rule with a limit counts the calls it covers
apart for each subject: its key, or each agent name its regex matches (one noisy agent then
cannot use up another's share). A call is admitted only if every rule that covers it has room:

    rpm             calls admitted in the last 60 s < rpm
    tpm             prompt + completion tokens of calls that ended in the last 60 s < tpm
                    (a call's tokens are known only once it ends, so one call may overshoot)
    max_concurrent  calls in progress < max_concurrent

Refused, it gets a 429 in OpenAI's shape with `Retry-After`: the seconds until the oldest
count leaves the window (1 for max_concurrent). Proxies sharing one PostgreSQL store share the
limits: every `SYNC_S` each adds its new counts to the store's `quota_usage` (per subject and
second) and its calls in progress to `quota_in_progress`, and reads the others' totals, which
its own admissions count on top of its own; so a limit holds across proxies to within one
sync's traffic (a proxy silent for 5 s no longer counts as having calls in progress). Shadow
samples never pass here, and calls in an evaluation episode opened through this proxy with an
admin key (or with no keys configured; `POST /v1/episodes` with metadata `{"eval": true}`)
count against nothing: a client key cannot open its way out of its limits.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable, Sequence

from flywheel.proxy.errors import ApiError
from flywheel.proxy.policy import KeyRule, RecentIds, Rule
from flywheel.store.records import QuotaUsage
from flywheel.store.writer import BatchWriter

log = logging.getLogger("flywheel.proxy")

WINDOW_S = 60.0
SYNC_S = 1.0  # how often proxies on a shared store exchange their counts
_SILENT_S = 5 * SYNC_S  # a proxy that has not reported for this long no longer counts as having calls in progress
_MAX_IDLE_SUBJECTS = 10_000  # counters of subjects with nothing in their windows, kept before a sweep


@dataclass
class _Counters:
    admitted: deque = field(default_factory=deque)  # admission times within the window
    tokens: deque = field(default_factory=deque)  # (end time, tokens) within the window
    token_sum: int = 0
    in_progress: int = 0
    others_calls: int = 0  # the other proxies' counts within the window, as of the last sync
    others_tokens: int = 0
    others_in_progress: int = 0
    reported_in_progress: int = 0  # what this proxy last told the others

    def expire(self, now: float) -> None:
        while self.admitted and self.admitted[0] <= now - WINDOW_S:
            self.admitted.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.token_sum -= self.tokens.popleft()[1]

    @property
    def idle(self) -> bool:
        return not (self.admitted or self.tokens or self.in_progress or self.reported_in_progress
                    or self.others_calls or self.others_tokens or self.others_in_progress)


class OverLimit(ApiError):
    def __init__(self, limit: str, value: int, subject: str, retry_after_s: float):
        retry = max(1, math.ceil(retry_after_s))
        super().__init__(429, f"{subject} is over its {limit} limit of {value}; retry in {retry} s",
                         "rate_limit_exceeded", headers={"Retry-After": str(retry)})
        self.limit = limit


@dataclass(frozen=True)
class Ticket:
    """An admitted call's counters (with their subjects' keys), to release when it ends."""

    counters: tuple[tuple[str, _Counters], ...]


class Quotas:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._subjects: dict[str, _Counters] = {}
        self._unsynced: dict[tuple[str, int], list[int]] = {}  # (subject, unix second) -> [calls, tokens]
        self.exempt = RecentIds()  # held-out evaluation episodes opened here with an admin key: no limit

    def admit(self, limited: Sequence[tuple[Rule, str]]) -> Ticket:
        """Count a call against each (rule, subject), or raise OverLimit (counting nothing)."""
        now = self.clock()
        found = []
        for rule, subject in limited:
            key = _key(rule, subject)
            counters = self._subjects.setdefault(key, _Counters())
            counters.expire(now)
            if rule.rpm and len(counters.admitted) + counters.others_calls >= rule.rpm:
                own_share = len(counters.admitted) >= rule.rpm  # else the others' calls: wait a sync
                raise OverLimit("rpm", rule.rpm, subject, counters.admitted[0] + WINDOW_S - now if own_share else 1)
            if rule.tpm and counters.token_sum + counters.others_tokens >= rule.tpm:
                raise OverLimit("tpm", rule.tpm, subject, self._tokens_free_in(counters, rule.tpm, now)
                                if counters.token_sum >= rule.tpm else 1)
            if rule.max_concurrent and counters.in_progress + counters.others_in_progress >= rule.max_concurrent:
                raise OverLimit("max_concurrent", rule.max_concurrent, subject, 1)
            found.append((key, counters))
        second = int(time.time())
        for key, counters in found:
            counters.admitted.append(now)
            counters.in_progress += 1
            self._unsynced.setdefault((key, second), [0, 0])[0] += 1
        if len(self._subjects) > _MAX_IDLE_SUBJECTS:
            self._sweep(now)
        return Ticket(tuple(found))

    def release(self, ticket: Ticket, tokens: int) -> None:
        """The call ended having used `tokens` (prompt + completion)."""
        now, second = self.clock(), int(time.time())
        for key, counters in ticket.counters:
            counters.in_progress -= 1
            if tokens:
                counters.tokens.append((now, tokens))
                counters.token_sum += tokens
                self._unsynced.setdefault((key, second), [0, 0])[1] += tokens

    def take_unsynced(self) -> tuple[tuple[tuple[str, datetime, int, int], ...], tuple[tuple[str, int], ...]]:
        """For the store: this proxy's counts since the last call, (subject, second, calls, tokens),
        and its calls in progress, (subject, calls), for every subject with some or that had some."""
        counts, self._unsynced = self._unsynced, {}
        in_progress = []
        for key, counters in self._subjects.items():
            if counters.in_progress or counters.reported_in_progress:
                in_progress.append((key, counters.in_progress))
                counters.reported_in_progress = counters.in_progress
        return (tuple((key, datetime.fromtimestamp(second, timezone.utc), calls, tokens)
                      for (key, second), (calls, tokens) in counts.items()), tuple(in_progress))

    def set_others(self, totals: dict[str, tuple[int, int, int]]) -> None:
        """The other proxies' counts within the window and calls in progress, by subject (the
        store's answer to a sync)."""
        for key, counters in self._subjects.items():
            counters.others_calls, counters.others_tokens, counters.others_in_progress = totals.pop(key, (0, 0, 0))
        for key, (calls, tokens, busy) in totals.items():
            self._subjects[key] = _Counters(others_calls=calls, others_tokens=tokens, others_in_progress=busy)

    @staticmethod
    def _tokens_free_in(counters: _Counters, tpm: int, now: float) -> float:
        """Seconds until enough counted tokens leave the window to bring the sum under `tpm`."""
        remaining = counters.token_sum
        for ended, tokens in counters.tokens:
            remaining -= tokens
            if remaining < tpm:
                return ended + WINDOW_S - now
        return WINDOW_S

    def _sweep(self, now: float) -> None:
        for key, counters in list(self._subjects.items()):
            counters.expire(now)
            if counters.idle:
                del self._subjects[key]


def _key(rule: Rule, subject: str) -> str:
    """A subject's counters' name, the same in every proxy with the same configuration."""
    return subject if isinstance(rule, KeyRule) else f"agents {rule.match} {subject}"


def limited(rules: Sequence[Rule], key_id: str | None, agent: str) -> list[tuple[Rule, str]]:
    """The (rule, subject) pairs a call counts against: a key's rule by key, an agent's by agent name."""
    return [(rule, f"key {key_id}" if isinstance(rule, KeyRule) else f"agent {agent!r}") for rule in rules
            if rule.limits]


async def share(quotas: Quotas, writer: BatchWriter, proxy_id: str, any_limits: Callable[[], bool]) -> None:
    """Exchange counts with the other proxies on the (PostgreSQL) store every SYNC_S, until cancelled.
    While the store cannot write, counts wait for the next round; a round that fails is logged and
    its counts are not shared (the limits hold a little looser for a second). `any_limits`: whether
    the rules as configured now (a reload may change them) set any limit; none, no round."""
    while True:
        await asyncio.sleep(SYNC_S)
        if writer.failing is not None:
            continue
        if not any_limits():
            continue
        now = datetime.now(timezone.utc)
        counts, in_progress = quotas.take_unsynced()
        try:
            quotas.set_others(await writer.submit(QuotaUsage(
                proxy_id, counts, in_progress, now, since=now - timedelta(seconds=WINDOW_S),
                reported_after=now - timedelta(seconds=_SILENT_S))))
        except Exception as failed:  # noqa: BLE001 - a background loop: log it and try next round
            log.warning("sharing quota counts with the other proxies failed: %r", failed)
