"""Credit assignment: from a rewarded episode to one transition per LLM call being trained.

LightningRL: an episode's outcome reaches every LLM call of the agents being trained,
each call one transition (prompt tokens -> completion tokens). A call with shadow samples
(the proxy's resamples of its prompt, `Call.shadow_of`) is the exception: it and its shadows
form a comparison group, each credited with its own grade (its latest call-level reward), and
the learner centres them on each other (learner/advantages.py). Pure functions over the
protobuf messages the proxy sends; no model, no I/O.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Mapping, Sequence

from flywheel.protos import flywheel_pb2 as pb


@dataclass(frozen=True)
class Transition:
    episode_id: str
    task_id: str
    agent: str
    seq: int
    adapter: str  # served name of the version that sampled it, e.g. "solver-v3"
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    behavior_logprobs: tuple[float, ...]  # from vLLM, one per completion token
    temperature: float
    reward: float  # the credit this call receives
    dims: Mapping[str, float] = field(default_factory=dict)  # the credit of each named dimension, when asked for
    comparison: str = ""  # the call whose comparison group (it and its shadow samples) this is scored in
    call_id: str = ""  # the call it was made from


@dataclass(frozen=True)
class CreditConfig:
    """`[learner.credit]`: how an episode's outcome becomes each call's reward."""

    # identical: every trained call gets the episode's reward (LightningRL); discounted: gamma per call from the end
    mode: Literal["identical", "discounted"] = "identical"
    # discounted: reward * gamma ** (calls after this one in the episode)
    gamma: float = 1.0
    # a call's own feedback is added to, or overrides, its credit
    call_feedback: Literal["add", "override"] = "add"
    # reward = sum(weight * dims[name]); the name "reward" weighs the scalar (unset: the scalar reward alone)
    dim_weights: Mapping[str, float] | None = None
    # drop completions cut off by max_tokens. Off by default: in an agent system the outcome was
    # graded on exactly the cut-off text, so the reward is the truth about it, and rambling past
    # max_tokens is behaviour to unlearn. Tried as a new user would (a replier with 32 tokens),
    # skipping threw away 88 of 128 calls of the first round. DAPO skips them because its
    # reward model grades unfinished answers as noise; turn this on when yours does too.
    skip_truncated: bool = False
    # drop transitions whose prompt + completion is longer
    max_tokens: int = 4096


def agent_filter(pattern: str) -> Callable[[str], bool]:
    """Agents to train: a regex matched against the whole name (e.g. "planner|writer", ".*")."""
    compiled = re.compile(pattern)
    return lambda agent: compiled.fullmatch(agent) is not None


def scalar_reward(reward: pb.Reward, dim_weights: Mapping[str, float] | None) -> float:
    """r, or with weights: sum_d w_d * dims[d] (+ w_reward * r). Missing dims count 0."""
    if not dim_weights:
        return reward.reward
    return sum(w * (reward.reward if name == "reward" else reward.dims.get(name, 0.0))
               for name, w in dim_weights.items())


def latest(rewards: Iterable[pb.Reward]) -> pb.Reward | None:
    """The latest feedback wins: later outcomes correct earlier ones."""
    found = None
    for reward in rewards:
        found = reward
    return found


def skip_reason(call: pb.Call, config: CreditConfig) -> str | None:
    """Why a call cannot be trained on, or None. Kept in the store either way."""
    if call.status != 200:
        return "error_status"
    if not call.completion_token_ids:
        return "no_token_ids"  # an upstream that ignores return_token_ids
    if len(call.completion_logprobs) != len(call.completion_token_ids):
        return "no_logprobs"
    if not call.prompt_token_ids:
        return "no_prompt_ids"
    if call.choices > 1:  # the outcome followed whichever choice the agent used; only choice 0 is recorded
        return "several_choices"
    if call.temperature < 1e-5:  # argmax decoding: no sampling distribution to weigh the tokens against
        return "greedy"
    if reshaped_distribution(call):
        return "unsupported_sampling"
    if config.skip_truncated and call.finish_reason == "length":
        return "truncated"
    if len(call.prompt_token_ids) + len(call.completion_token_ids) > config.max_tokens:
        return "too_long"
    return None


def reshaped_distribution(call: pb.Call) -> bool:
    """True when vLLM sampled from more than the temperature-scaled softmax (top-p, top-k, min-p,
    penalties): the learner recomputes only temperature-scaled log-probs, so its importance
    weights would compare different distributions. 0 counts as unset for every field."""
    return (0 < call.top_p < 1 or call.top_k > 0 or call.min_p > 0 or call.presence_penalty != 0
            or call.frequency_penalty != 0 or call.repetition_penalty not in (0.0, 1.0))


def call_credits(episode: pb.Episode, config: CreditConfig,
                 value: Callable[[pb.Reward], float] | None = None) -> dict[str, float]:
    """Credit per call id, before filtering, of `value` (default: `scalar_reward`) of the feedback.

    identical:  c_i = R                          (R: the episode's latest reward)
    discounted: c_i = R * gamma ** (n - 1 - k_i)  (k_i: the call's position among the n calls)
    then a call's own latest feedback f_i:  add: c_i + f_i,  override: f_i.
    """
    value = value or (lambda reward: scalar_reward(reward, config.dim_weights))
    episode_reward = latest(episode.rewards)
    total = value(episode_reward) if episode_reward is not None else 0.0
    calls = sorted((c for c in episode.calls if not c.shadow_of), key=lambda c: c.seq)
    credits = {}
    for position, call in enumerate(calls):
        credit = total if config.mode == "identical" else total * config.gamma ** (len(calls) - 1 - position)
        own = latest(call.rewards)
        if own is not None:
            credit = value(own) if config.call_feedback == "override" else credit + value(own)
        credits[call.call_id] = credit
    return credits


def dimension(name: str) -> Callable[[pb.Reward], float]:
    """One named dimension of a feedback (missing: 0); the name "reward" is the scalar reward."""
    return lambda reward: reward.reward if name == "reward" else reward.dims.get(name, 0.0)


def comparison_credits(episode: pb.Episode, config: CreditConfig,
                       value: Callable[[pb.Reward], float] | None = None) -> dict[str, tuple[str, float]]:
    """call id -> (comparison group, credit) for each call with shadow samples and each shadow
    the grader scored: the group is named by the original's call id, the credit is `value`
    (default: `scalar_reward`) of the member's grade, its latest call-level reward from the
    source that graded the shadows (a client's own feedback on the original is not a grade)."""
    value = value or (lambda reward: scalar_reward(reward, config.dim_weights))
    graders = {c.shadow_of: latest(c.rewards).source for c in episode.calls if c.shadow_of and c.rewards}
    credits = {}
    for call in episode.calls:
        group = call.shadow_of or call.call_id
        if group in graders:
            grade = latest(r for r in call.rewards if r.source == graders[group])
            if grade is not None:
                credits[call.call_id] = (group, value(grade))
    return credits


def assign(episode: pb.Episode, config: CreditConfig, trains: Callable[[str], bool],
           dims: Sequence[str] = ()) -> tuple[list[Transition], Counter]:
    """Transitions of the trained agents' calls, and a count of the calls skipped, by reason;
    each also carries the credit of every dimension named in `dims`, by the same rule. A call in
    a comparison group takes its grade (`comparison_credits`) when at least one other member is
    trained too; otherwise an original keeps the episode's credit, and a shadow is skipped
    (`ungraded_shadow`: not graded, or nothing left to compare it with)."""
    credits = call_credits(episode, config)
    compared = comparison_credits(episode, config)
    episode_dims = {name: call_credits(episode, config, dimension(name)) for name in dims}
    compared_dims = {name: comparison_credits(episode, config, dimension(name)) for name in dims}
    trained, skipped = [], Counter()
    for call in episode.calls:
        if not trains(call.agent):
            continue
        reason = skip_reason(call, config)
        if reason is not None:
            skipped[reason] += 1
        else:
            trained.append(call)
    members = Counter(compared[c.call_id][0] for c in trained if c.call_id in compared)
    transitions = []
    for call in trained:
        group, credit = compared.get(call.call_id, ("", 0.0))
        if members[group] < 2:
            if call.shadow_of:
                skipped["ungraded_shadow"] += 1
                continue
            group, credit = "", credits[call.call_id]
        transitions.append(Transition(
            call_id=call.call_id, episode_id=episode.episode_id, task_id=episode.task_id, agent=call.agent,
            seq=call.seq, adapter=call.adapter, prompt_ids=tuple(call.prompt_token_ids),
            completion_ids=tuple(call.completion_token_ids), behavior_logprobs=tuple(call.completion_logprobs),
            temperature=call.temperature or 1.0, reward=credit,
            dims={name: compared_dims[name][call.call_id][1] if group else episode_dims[name][call.call_id]
                  for name in dims},
            comparison=group,
        ))
    return transitions, skipped
