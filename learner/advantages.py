"""Advantages: GRPO groups, rolling groups, DAPO dynamic sampling, a bounded baseline for singletons.

A group is the episodes of one task id, seen from one agent: each member episode brings
that agent's calls in it. With `TaskReturns`, a group also holds the task's latest returns
already trained on (a rolling group: attempts that arrive over several updates are each
trained once, on-policy, against the task's recent attempts). An episode without a task
id (one-off production traffic), or the only attempt of its task, is a singleton: it is
scored against its agent's running reward baseline. A call with shadow samples (one-off
traffic the proxy resampled) is scored in its comparison group instead: it and its shadows,
each with its own grade, as one GRPO group. Pure functions; the only state is the
per-agent `Baseline` and the `TaskReturns`, passed in and updated in place (the caller
decides whether to keep them).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Sequence

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
    # GDPO: {dimension: weight}. Each named dimension of the feedback (its `dims`; "reward" is the
    # scalar) is normalized within its group first, then A = sum_d w_d * z_d, so one noisy or
    # wide-ranging dimension cannot drown the others. Groups only: one-off episodes keep the scalar
    dim_weights: Mapping[str, float] | None = None


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


@dataclass
class TaskReturns:
    """The latest group values (episode returns, or call rewards at level="call") of each
    (agent, task) already trained on, oldest first: the rest of a rolling group."""

    window: int = 8  # a rolling group's size: new values plus the latest window - len(new) of these
    limit: int = 100_000  # (agent, task) pairs remembered; the least recently trained are forgotten first
    values: dict[str, list[float]] = field(default_factory=dict)  # "agent\ttask" -> values, oldest first

    @staticmethod
    def key(agent: str, task: str, dim: str = "") -> str:
        return f"{agent}\t{task}" + (f"\t{dim}" if dim else "")

    def prior(self, agent: str, task: str, new: int, dim: str = "") -> list[float]:
        """The remembered values (of dimension `dim`, with GDPO) that join `new` new ones in a rolling group."""
        keep = self.window - new
        return self.values.get(self.key(agent, task, dim), [])[-keep:] if keep > 0 else []

    def attempts(self) -> dict[str, int]:
        """task -> the most values remembered for it by any agent."""
        counts: dict[str, int] = {}
        for key, values in self.values.items():
            task = key.split("\t", 1)[1]
            counts[task] = max(counts.get(task, 0), len(values))
        return counts

    def add(self, agent: str, task: str, values: Sequence[float], dim: str = "") -> None:
        key = self.key(agent, task, dim)
        self.values[key] = (self.values.pop(key, []) + list(values))[-self.window:]  # re-inserted: most recent
        while len(self.values) > self.limit:
            del self.values[next(iter(self.values))]


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


def group_values(members: Sequence[Sequence[Transition]], level: str,
                 value: Callable[[Transition], float] = lambda t: t.reward) -> list[float]:
    """What a group's statistics are over: each call's credit (level="call") or each
    episode's return (level="episode"); of `value` (default the scalar credit; a dimension's)."""
    if level == "call":
        return [value(t) for episode in members for t in episode]
    return [sum(value(t) for t in episode) / len(episode) for episode in members]


def normalized_dims(members: Sequence[Sequence[Transition]], config: AdvantageConfig,
                    priors_DV: Mapping[str, Sequence[float]]) -> list[float] | None:
    """GDPO: for every transition of the group, with V_d = priors_DV[d] + the members' values of
    dimension d (`group_values`),

        A_t = sum_d w_d * (x_td - mean(V_d)) / (std(V_d) + eps)

    A dimension constant within the group adds nothing; None when every one is constant."""
    flat = [t for episode in members for t in episode]
    advantages_T = [0.0] * len(flat)
    varied = False
    for name, weight in (config.dim_weights or {}).items():
        values_V = list(priors_DV.get(name, ())) + group_values(members, config.level, lambda t: t.dims[name])
        if max(values_V) == min(values_V):
            continue
        varied = True
        mean, spread = sum(values_V) / len(values_V), std(values_V) + config.eps
        for i, t in enumerate(flat):
            advantages_T[i] += weight * (t.dims[name] - mean) / spread
    return advantages_T if varied else None


def centred_on_group(members: Sequence[Sequence[Transition]], config: AdvantageConfig,
                     prior_V: Sequence[float] = ()) -> list[float]:
    """Advantages of every transition of a group whose members are episodes (lists of transitions),
    with the statistics over V = prior_V + the members' values (`group_values`):

        A_t = (r_t - mean(V)) / (std(V) + eps)    (without the division unless scale="group")

    level="call": V holds call credits; level="episode": episode returns R_e (the mean of the
    episode's call credits), so an episode with five calls counts once. prior_V: the task's
    values already trained on (a rolling group), empty for a group trained whole.
    """
    values_V = list(prior_V) + group_values(members, config.level)
    mean = sum(values_V) / len(values_V)
    spread = std(values_V) + config.eps if config.scale == "group" else 1.0
    return [(t.reward - mean) / spread for episode in members for t in episode]


def group_advantages(members: Sequence[Sequence[Transition]], config: AdvantageConfig,
                     prior_V: Sequence[float] = (), priors_DV: Mapping[str, Sequence[float]] = {}
                     ) -> list[float] | None:
    """A group's advantages: GRPO (`centred_on_group`), or GDPO (`normalized_dims`) with
    `dim_weights`; None when the group and its prior values are all equal (it teaches nothing)."""
    if config.dim_weights:
        return normalized_dims(members, config, priors_DV)
    rewards = [t.reward for calls in members for t in calls] + list(prior_V)
    return None if max(rewards) == min(rewards) else centred_on_group(members, config, prior_V)


def episode_return(transitions: Sequence[Transition]) -> float:
    """An episode's reward as one agent saw it: the mean credit of the agent's calls in it."""
    return group_values([transitions], "episode")[0]


def singleton_advantage(reward: float, baseline: Baseline, config: AdvantageConfig) -> float:
    """A = (r - b) / max(std_b, std_floor) with scale="group"; r - b otherwise (b: the baseline's mean)."""
    centred = reward - baseline.mean
    if config.scale == "group":
        return centred / max(math.sqrt(baseline.var), config.std_floor)
    return centred


def compute_advantages(transitions: Sequence[Transition], config: AdvantageConfig,
                       baselines: dict[str, Baseline],
                       task_returns: TaskReturns | None = None) -> tuple[list[Scored], AdvantageStats]:
    """Advantages for every transition that carries a learning signal.

    Groups of two or more episodes (same agent, same task id), counting with `task_returns`
    the task's values already trained on: GRPO (`centred_on_group`, whose prior values are
    the remembered ones), or with `dim_weights` GDPO (`normalized_dims`). Groups whose rewards and prior values are all equal teach nothing
    and are dropped (DAPO dynamic sampling); with `task_returns` their values are still
    remembered, so the task's later attempts are scored against them. Singletons are scored
    against their agent's baseline as it was before their episode (`singleton_advantage`),
    once the baseline has seen `baseline_warmup` episodes. Every episode then updates its
    agent's baseline once, with its return, in arrival order, grouped or not. A comparison
    group (a call and its shadow samples, `Transition.comparison`) is a group of its own, each
    transition a member; it neither uses nor updates the baseline.
    """
    episodes: dict[tuple[str, str], list[Transition]] = defaultdict(list)  # (agent, episode) -> its calls
    compared: dict[tuple[str, str], list[Transition]] = defaultdict(list)  # (agent, call) -> its group
    for t in transitions:
        (compared[(t.agent, t.comparison)] if t.comparison else episodes[(t.agent, t.episode_id)]).append(t)
    groups: dict[tuple[str, str], list[list[Transition]]] = defaultdict(list)
    for (agent, episode_id), calls in episodes.items():
        groups[(agent, calls[0].task_id or f"\0episode-{episode_id}")].append(calls)
    priors_V = {(agent, task): task_returns.prior(agent, task, len(members))
                if task_returns is not None and members[0][0].task_id
                else [] for (agent, task), members in groups.items()}
    grouped = {id(calls) for key, members in groups.items() if len(members) + len(priors_V[key]) >= 2
               for calls in members}
    stats = AdvantageStats()
    scored: list[Scored] = []
    dims = tuple(config.dim_weights or ())
    for (agent, task), members in groups.items():
        rolling = task_returns is not None and bool(members[0][0].task_id)
        priors_DV = {d: task_returns.prior(agent, task, len(members), d) for d in dims} if rolling else {}
        if rolling:
            task_returns.add(agent, task, group_values(members, config.level))
            for d in dims:
                task_returns.add(agent, task, group_values(members, config.level, lambda t, d=d: t.dims[d]), d)
        if id(members[0]) not in grouped:
            continue
        advantages = group_advantages(members, config, priors_V[(agent, task)], priors_DV)
        if advantages is None:
            stats.skipped["zero_variance_group"] += sum(len(calls) for calls in members)
            continue
        stats.groups += 1
        scored += [Scored(t, a) for t, a in zip((t for calls in members for t in calls), advantages)]
    for group in compared.values():
        members = [[t] for t in group]
        advantages = group_advantages(members, config) if len(members) >= 2 else None
        if advantages is None:
            stats.skipped["zero_variance_group" if len(members) >= 2 else "comparison_of_one"] += len(group)
            continue
        stats.groups += 1
        scored += [Scored(t, a) for t, a in zip(group, advantages)]
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
