"""Advantages: GRPO groups, DAPO dynamic sampling, and a baseline for production singletons.

A group is the transitions of one agent on one task id (the G episodes that attempted
the task). Pure functions; the only state is the per-agent `Baseline`, passed in.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Literal, Sequence

from flywheel.learner.credit import Transition


@dataclass(frozen=True)
class AdvantageConfig:
    """`[learner.advantages]`: how credited rewards become advantages."""

    # divide centred rewards by the group's reward std | the batch's reward std | not at all
    scale: Literal["group", "batch", "none"] = "group"
    # added to the std, as in TRL
    eps: float = 1e-4
    # singletons: EMA weight of the past in the per-agent baseline
    baseline_decay: float = 0.9


@dataclass
class Baseline:
    """Running mean and variance of one agent's rewards (exponential moving averages)."""

    mean: float = 0.0
    var: float = 1.0
    seen: int = 0

    def update(self, reward: float, decay: float) -> None:
        if self.seen == 0:
            self.mean, self.var = reward, 0.0
        else:
            delta = reward - self.mean
            self.mean += (1 - decay) * delta
            self.var = decay * (self.var + (1 - decay) * delta * delta)
        self.seen += 1


@dataclass(frozen=True)
class Scored:
    transition: Transition
    advantage: float


@dataclass
class AdvantageStats:
    mean: float = 0.0
    std: float = 0.0
    groups: int = 0
    skipped: Counter = field(default_factory=Counter)


def std(values_G: Sequence[float]) -> float:
    """Sample standard deviation (Bessel's correction, like torch.std)."""
    if len(values_G) < 2:
        return 0.0
    mean = sum(values_G) / len(values_G)
    return math.sqrt(sum((v - mean) ** 2 for v in values_G) / (len(values_G) - 1))


def group_advantages(rewards_G: Sequence[float], scale: str, eps: float) -> list[float]:
    """A_i = (r_i - mean(r)) / (std(r) + eps) with scale="group"; r_i - mean(r) otherwise."""
    mean = sum(rewards_G) / len(rewards_G)
    centred_G = [r - mean for r in rewards_G]
    if scale == "group":
        spread = std(rewards_G)
        return [a / (spread + eps) for a in centred_G]
    return centred_G


def compute_advantages(transitions: Sequence[Transition], config: AdvantageConfig,
                       baselines: dict[str, Baseline]) -> tuple[list[Scored], AdvantageStats]:
    """Advantages for every transition that carries a learning signal.

    Groups of two or more (same agent, same task id): GRPO. Groups whose rewards are all
    equal teach nothing and are dropped (DAPO dynamic sampling). A transition alone in its
    group (production traffic without repeated tasks) is scored against its agent's
    running baseline, A = (r - b) / (sqrt(var_b) + eps) under scale="group"; the first
    reward an agent shows only starts its baseline. Baselines learn from every reward.
    """
    groups: dict[tuple[str, str], list[Transition]] = defaultdict(list)
    for i, t in enumerate(transitions):
        groups[(t.agent, t.task_id or f"\0singleton-{i}")].append(t)
    stats = AdvantageStats()
    scored: list[Scored] = []
    for (agent, _), members in groups.items():
        baseline = baselines.setdefault(agent, Baseline())
        rewards_G = [t.reward for t in members]
        if len(members) >= 2:
            if max(rewards_G) == min(rewards_G):
                stats.skipped["zero_variance_group"] += len(members)
            else:
                stats.groups += 1
                scored += [Scored(t, a) for t, a in
                           zip(members, group_advantages(rewards_G, config.scale, config.eps))]
        elif baseline.seen == 0:
            stats.skipped["no_baseline_yet"] += 1
        else:
            advantage = rewards_G[0] - baseline.mean
            if config.scale == "group":
                advantage /= math.sqrt(baseline.var) + config.eps
            if advantage == 0.0:
                stats.skipped["zero_advantage"] += 1
            else:
                scored.append(Scored(members[0], advantage))
        for reward in rewards_G:
            baseline.update(reward, config.baseline_decay)
    if config.scale == "batch" and len(scored) >= 2:  # TRL's scale_rewards="batch": std of the batch's rewards
        spread = std([s.transition.reward for s in scored])
        scored = [Scored(s.transition, s.advantage / (spread + config.eps)) for s in scored]
    if scored:
        stats.mean = sum(s.advantage for s in scored) / len(scored)
        stats.std = std([s.advantage for s in scored])
    return scored, stats
