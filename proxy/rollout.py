"""The rollout loop: decides each candidate and watches each newly active version.

Every `check_interval_s` it reads, for each agent with a candidate or a watched version, the
rewarded episodes opened since the comparison began (`Store.version_rewards`), splits them
by the version that served them, and applies the test in `flywheel.proxy.canary`: promote,
reject, roll back, or wait for the next look. Each comparison is kept in the version's
`comparison` column (and so in `GET /v1/adapters` and `flywheel status`); decisions carry
their reason in `reason`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from statistics import NormalDist

from flywheel.proxy.canary import (PROMOTE, REJECT, Arm, PromotionConfig, arm, look_alpha, looks_reached,
                                   non_inferiority, watch_verdict)
from flywheel.proxy.errors import ApiError
from flywheel.proxy.metrics import Metrics
from flywheel.proxy.registry import STANDBY, Registry, Version
from flywheel.store.records import ServedReward
from flywheel.store.writer import BatchWriter

log = logging.getLogger("flywheel.rollout")

_EPOCH = datetime.fromtimestamp(0, timezone.utc)


@dataclass(frozen=True)
class Sides:
    """The rewards of a comparison, by side (oldest first), and which episodes they are."""

    new_N: list[float]
    old_M: list[float]
    basis: str  # "eval" (held-out evaluation episodes only) or "live" (every rewarded episode)
    eval_episodes: tuple[int, int]  # evaluation episodes among them, new side and old side


def split_sides(rewards: list[ServedReward], new: str, is_old, min_episodes: int) -> Sides:
    """Rewards served by `new` and by the old side (`is_old(adapter)`), eval episodes only when
    each side has `min_episodes` of them."""
    new_all = [(r.reward, r.is_eval) for r in rewards if r.adapter == new]
    old_all = [(r.reward, r.is_eval) for r in rewards if r.adapter != new and is_old(r.adapter)]
    evals = (sum(e for _, e in new_all), sum(e for _, e in old_all))
    use_eval = min(evals) >= min_episodes
    pick = (lambda pairs: [r for r, e in pairs if e]) if use_eval else (lambda pairs: [r for r, _ in pairs])
    return Sides(pick(new_all), pick(old_all), "eval" if use_eval else "live", evals)


def comparison_json(sides: Sides, new: Arm, old: Arm, verdict, confidence: float, look: int, kind: str) -> dict:
    """The sides as they stand, and the latest look's verdict (callers keep an earlier one when there is none)."""
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    side = lambda a: {"episodes": a.episodes, "mean_reward": round(a.mean, 4),  # noqa: E731
                      "interval": [round(x, 4) for x in a.interval(z)]}
    body = {"kind": kind, "basis": sides.basis, "eval_episodes": list(sides.eval_episodes), "look": look,
            "new": side(new), "old": side(old), "checked_at": datetime.now(timezone.utc).isoformat()}
    if verdict is not None:
        body |= {"difference": round(verdict.difference, 4),
                 "difference_interval": [round(verdict.lower, 4), round(verdict.upper, 4)],
                 "alpha": verdict.alpha, "outcome": verdict.outcome}
    return body


class Rollout:
    def __init__(self, config: PromotionConfig, registry: Registry, writer: BatchWriter, metrics: Metrics):
        self.config = config
        self.registry = registry
        self.writer = writer
        self.metrics = metrics

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.check_interval_s)
            try:
                await self.check()
            except Exception:  # a store hiccup must not end the rollout
                log.exception("rollout check failed")

    async def check(self) -> None:
        for agent, candidate in list(self.registry.candidates.items()):
            await self._judge(agent, candidate)
        if self.config.watch_episodes:
            for agent, active in list(self.registry.active.items()):
                if _watching(active):
                    await self._watch(agent, active)

    # ---- candidates ---------------------------------------------------------

    async def _judge(self, agent: str, candidate: Version) -> None:
        config = self.config
        active = self.registry.active.get(agent)
        since = max(candidate.row.created_at, active.row.live_at or _EPOCH) if active else candidate.row.created_at
        rewards = await self.writer.read(self.writer.store.version_rewards, agent, since)
        sides = split_sides(rewards, candidate.served_name, _is_served_by(agent, active), config.min_episodes)
        previous = _section(candidate, "canary")
        done = previous.get("looks_done", 0)
        reached = min(looks_reached(min(len(sides.new_N), len(sides.old_M)), config.min_episodes), config.max_looks)
        new, old = _arms(sides)
        verdict = None
        if reached > done:
            look = reached - 1
            verdict = non_inferiority(new, old, config.margin, look_alpha(look, 1 - config.confidence),
                                      last=look == config.max_looks - 1)
            done = reached
        body = previous | comparison_json(sides, new, old, verdict, config.confidence, done, "canary") | {
            "looks_done": done, "canary_fraction": self.registry.canary_fraction,
            "against": active.served_name if active else "base model"}
        waited = (datetime.now(timezone.utc) - candidate.row.created_at).total_seconds()
        comparison = json.dumps({**_sections(candidate), "canary": body})
        try:
            if verdict is not None and verdict.outcome == PROMOTE:
                await self.registry.promote(agent, _reason("promoted", verdict, body, config), comparison)
                decision = "auto_promote"
            elif verdict is not None and verdict.outcome == REJECT:
                await self.registry.reject(agent, _reason("rejected", verdict, body, config), comparison)
                decision = "auto_reject"
            elif waited > config.max_wait_s:
                await self.registry.reject(agent, _timeout_reason(body, config), comparison)
                decision = "auto_reject"
            else:
                if body["new"]["episodes"] != previous.get("new", {}).get("episodes") or \
                        body["old"]["episodes"] != previous.get("old", {}).get("episodes") or verdict is not None:
                    await self.registry.record(candidate, comparison)
                return
        except ApiError as gone:  # decided by hand meanwhile
            log.info("%s: %s", candidate.served_name, gone.message)
            return
        self.metrics.adapter_swaps.labels(agent, decision).inc()
        log.warning("%s %s", candidate.served_name, candidate.row.reason)

    # ---- watched versions ---------------------------------------------------

    async def _watch(self, agent: str, version: Version) -> None:
        config = self.config
        predecessor = self._predecessor(agent, version)
        history_from = predecessor.row.live_at if predecessor is not None else _EPOCH
        rewards = await self.writer.read(self.writer.store.version_rewards, agent, history_from or _EPOCH)
        live_at = version.row.live_at
        served_by_old = _is_served_by(agent, predecessor)
        old_rewards = [r.reward for r in rewards if r.created_at < live_at and served_by_old(r.adapter)]
        old_rewards = old_rewards[-config.watch_episodes:]
        new_rewards = [r.reward for r in rewards
                       if r.created_at >= live_at and r.adapter == version.served_name][:config.watch_episodes]
        sides = Sides(new_rewards, old_rewards, "live", (0, 0))
        previous = _section(version, "watch")
        done = previous.get("looks_done", 0)
        new, old = _arms(sides)
        verdict = None
        ended = len(new_rewards) >= config.watch_episodes
        if len(old_rewards) >= config.min_episodes:
            reached = looks_reached(len(new_rewards), config.min_episodes)
            if reached > done:
                verdict = watch_verdict(new, old, config.margin, look_alpha(reached - 1, 1 - config.confidence))
                done = reached
        body = previous | comparison_json(sides, new, old, verdict, config.confidence, done, "watch") | {
            "looks_done": done, "against": predecessor.served_name if predecessor else "base model",
            "since": live_at.isoformat() if live_at else None, "ended": ended or len(old_rewards) < config.min_episodes}
        if len(old_rewards) < config.min_episodes:
            body["note"] = f"the predecessor served {len(old_rewards)} rewarded episodes (< min_episodes): not watched"
        comparison = json.dumps({**_sections(version), "watch": body})
        if verdict is not None and verdict.outcome == REJECT:
            reason = (f"rolled back automatically: mean reward {verdict.difference:+.3f} against "
                      f"{body['against']} over {len(new_rewards)} vs {len(old_rewards)} episodes, "
                      f"interval up to {verdict.upper:+.3f} < -{config.margin} (look {done})")
            await self.registry.record(version, comparison)
            if self.registry.active.get(agent) is version:
                await self.registry.rollback(agent, reason)
                self.metrics.adapter_swaps.labels(agent, "auto_rollback").inc()
                log.warning("%s %s", version.served_name, reason)
        elif body != {**previous, "checked_at": body["checked_at"]}:
            await self.registry.record(version, comparison)

    def _predecessor(self, agent: str, version: Version) -> Version | None:
        """What served the agent before `version` went live: its standby (None: the base model)."""
        return next((v for v in reversed(self.registry.versions[agent]) if v.row.status == STANDBY
                     and v.row.version < version.row.version), None)


def _watching(version: Version) -> bool:
    watch = _section(version, "watch")
    return version.row.live_at is not None and not watch.get("ended")


def _is_served_by(agent: str, version: Version | None):
    """Whether a call's `adapter` is `version`, or for None the base model (no version of the agent)."""
    if version is not None:
        return lambda adapter: adapter == version.served_name
    own = re.compile(rf"^{re.escape(agent)}-v\d+$")
    return lambda adapter: not own.match(adapter or "")


def _arms(sides: Sides) -> tuple[Arm, Arm]:
    """Both sides, with pseudo-episodes at the ends of the rewards' range, taken to span at least
    [0, 1] (for 0/1 rewards: Agresti-Caffo; when every reward is equal it still says how little n shows)."""
    values = sides.new_N + sides.old_M
    low, high = min([0.0, *values]), max([1.0, *values])
    return arm(sides.new_N, low, high), arm(sides.old_M, low, high)


def _sections(version: Version) -> dict:
    return json.loads(version.row.comparison) if version.row.comparison else {}


def _section(version: Version, kind: str) -> dict:
    return _sections(version).get(kind, {})


def _reason(decision: str, verdict, body: dict, config: PromotionConfig) -> str:
    return (f"{decision} at look {body['looks_done']} on {body['basis']} episodes: mean reward "
            f"{body['new']['mean_reward']:.3f} ({body['new']['episodes']} episodes) vs {body['old']['mean_reward']:.3f} "
            f"({body['old']['episodes']}); difference {verdict.difference:+.3f}, interval "
            f"[{verdict.lower:+.3f}, {verdict.upper:+.3f}] against margin -{config.margin}")


def _timeout_reason(body: dict, config: PromotionConfig) -> str:
    counts = f"{body['new']['episodes']} and {body['old']['episodes']} rewarded episodes"
    if min(body["new"]["episodes"], body["old"]["episodes"]) < config.min_episodes:
        return f"rejected: too little traffic in max_wait_s ({config.max_wait_s:g} s): {counts}, " \
               f"min_episodes {config.min_episodes} needed on each side"
    return f"rejected: undecided after max_wait_s ({config.max_wait_s:g} s) with {counts}"

