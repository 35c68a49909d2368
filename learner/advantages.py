"""Advantages: GRPO groups, DAPO dynamic sampling, and a bounded baseline for production singletons.

A group is the episodes of one task id, seen from one agent: each member episode brings
that agent's calls in it. An episode without a task id (one-off production traffic), or
the only episode of its task in the batch, is a singleton: it is scored against its
agent's running reward baseline. Pure functions; the only state is the per-agent
`Baseline`, passed in and updated in place (the caller decides whether to keep it).
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
    # group statistics over episodes (Agent Lightning's rollout-level advantage: an episode
    # with five calls of the agent counts once, not five times) or over calls
    level: Literal["episode", "call"] = "episode"
    # singletons: EMA weight of the past in the per-agent baseline (about 1 / (1 - decay) episodes of memory)
    baseline_decay: float = 0.9
    # singletons are scored only once their agent's baseline has seen this many episodes
    baseline_warmup: int = 4
    # singletons under scale = "group": divide by max(baseline std, std_floor), so a nearly constant
    # history (std ~ 0 after the first rewards) cannot blow one advantage up
    std_floor: float = 0.25


@dataclass
class Baseline:
    """Running mean and variance of one agent's episode rewards (exponential moving averages)."""

    mean: float = 0.0
    var: float = 0.0
    seen: int = 0

    def update(self, reward: float, decay: float) -> None:
        """First reward: mean = r, var = 0. Then d = r - mean; mean += (1 - decay) d;
        var = decay (var + (1 - decay) d^2)."""
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


def centred_on_group(members: Sequence[Sequence[Transition]], config: AdvantageConfig) -> list[float]:
    """Advantages of every transition of a group whose members are episodes (lists of transitions).

    level="call":    statistics over all calls:      A_t = (r_t - mean_t r) / (std_t r + eps)
    level="episode": statistics over episodes, R_e = mean of the episode's call credits:
                     A_t = (r_t - mean_e R) / (std_e R + eps)
    (without the division unless scale="group").
    """
    flat = [t.reward for episode in members for t in episode]
    if config.level == "call":
        return group_advantages(flat, config.scale, config.eps)
    returns_E = [episode_return(episode) for episode in members]
    mean = sum(returns_E) / len(returns_E)
    spread = std(returns_E) + config.eps if config.scale == "group" else 1.0
    return [(r - mean) / spread for r in flat]


def episode_return(transitions: Sequence[Transition]) -> float:
    """An episode's reward as one agent saw it: the mean credit of the agent's calls in it."""
    return sum(t.reward for t in transitions) / len(transitions)


def singleton_advantage(reward: float, baseline: Baseline, config: AdvantageConfig) -> float:
    """A = (r - b) / max(std_b, std_floor) with scale="group"; r - b otherwise (b: the baseline's mean)."""
    centred = reward - baseline.mean
    if config.scale == "group":
        return centred / max(math.sqrt(baseline.var), config.std_floor)
    return centred


def compute_advantages(transitions: Sequence[Transition], config: AdvantageConfig,
                       baselines: dict[str, Baseline]) -> tuple[list[Scored], AdvantageStats]:
    """Advantages for every transition that carries a learning signal.

    Groups of two or more episodes (same agent, same task id): GRPO (`centred_on_group`).
    Groups whose rewards are all equal teach nothing and are dropped (DAPO dynamic
    sampling). Singletons are scored against their agent's baseline as it was before
    their episode (`singleton_advantage`), once the baseline has seen `baseline_warmup`
    episodes. Every episode then updates its agent's baseline once, with its return, in
    the order the transitions came (arrival order), grouped or not.
    """
    episodes: dict[tuple[str, str], list[Transition]] = defaultdict(list)  # (agent, episode) -> its calls
    for t in transitions:
        episodes[(t.agent, t.episode_id)].append(t)
    groups: dict[tuple[str, str], list[list[Transition]]] = defaultdict(list)
    for (agent, episode_id), calls in episodes.items():
        groups[(agent, calls[0].task_id or f"\0episode-{episode_id}")].append(calls)
    grouped = {id(calls) for members in groups.values() if len(members) >= 2 for calls in members}
    stats = AdvantageStats()
    scored: list[Scored] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        rewards = [t.reward for calls in members for t in calls]
        if max(rewards) == min(rewards):
            stats.skipped["zero_variance_group"] += len(rewards)
            continue
        stats.groups += 1
        flat = [t for calls in members for t in calls]
        scored += [Scored(t, a) for t, a in zip(flat, centred_on_group(members, config))]
    for (agent, _), calls in episodes.items():  # arrival order
        baseline = baselines.setdefault(agent, Baseline())
        if id(calls) not in grouped:
            if baseline.seen < config.baseline_warmup:
                stats.skipped["no_baseline_yet"] += len(calls)
            else:
                for t in calls:
                    advantage = singleton_advantage(t.reward, baseline, config)
                    if advantage == 0.0:
                        stats.skipped["zero_advantage"] += 1
                    else:
                        scored.append(Scored(t, advantage))
        baseline.update(episode_return(calls), config.baseline_decay)
    if config.scale == "batch" and len(scored) >= 2:  # TRL's scale_rewards="batch": std of the batch's rewards
        spread = std([s.transition.reward for s in scored])
        scored = [Scored(s.transition, s.advantage / (spread + config.eps)) for s in scored]
    if scored:
        stats.mean = sum(s.advantage for s in scored) / len(scored)
        stats.std = std([s.advantage for s in scored])
    return scored, stats
