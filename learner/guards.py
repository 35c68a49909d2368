"""Training guards: limits on an update's metrics past which its version is not published.

An update that crosses one is kept (its weights stay the learner's, its episodes are used) but
its version is not published: the agents keep being served what they were, the reason is in
the learner's status and in `train_runs.held`. Publishing resumes with the next update that
stays within every limit (its version carries the held step too) or with `flywheel train
--force`, which publishes the held version as it is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GuardConfig:
    """`[learner.guards]`; 0 turns a limit off."""

    # most KL(policy before the step || after it) per completion position, exact over the vocabulary, on
    # the update's first micro-batch. Measured on SmolLM2-135M (8 calls, rank-4 LoRA, one step from B = 0):
    # 0.0036 at lr 3e-4 (the default), 0.031 at 3e-3, 1.9 at 3e-2, 6.2 at 0.3
    max_kl: float = 1.0
    # least mean token entropy of the policy on the batch: below it the policy has collapsed onto one
    # answer (off by default: a task with one right answer may be learned down to low entropy)
    min_entropy: float = 0.0
    # most mean completion length of a batch, as a multiple of the agent's first trained batch's
    # (completions growing without end are a known way GRPO policies game a reward)
    max_length_growth: float = 4.0
    # most gradient norm before clipping
    max_grad_norm: float = 0.0
    # most share of completion tokens whose ratio was clipped (only moves with ppo_epochs > 1)
    max_clip_fraction: float = 0.5


@dataclass(frozen=True)
class UpdateSignals:
    """What the guards look at, from one update of one adapter."""

    step_kl: float
    entropy: float
    mean_length: float  # completion tokens per trained call
    reference_length: float  # the agent's first trained batch's mean length
    grad_norm: float
    clip_fraction: float


def crossed(signals: UpdateSignals, config: GuardConfig) -> list[str]:
    """The limits `signals` cross, each said with its value: [] = publish. A NaN crosses every
    limit it meets (a step that produced one is not a step to serve)."""
    out = []
    if config.max_kl and not signals.step_kl <= config.max_kl:
        out.append(f"step KL {signals.step_kl:.4g} > max_kl {config.max_kl:g}")
    if config.min_entropy and not signals.entropy >= config.min_entropy:
        out.append(f"entropy {signals.entropy:.4g} < min_entropy {config.min_entropy:g}")
    growth = signals.mean_length / signals.reference_length if signals.reference_length else 1.0
    if config.max_length_growth and growth > config.max_length_growth:
        out.append(f"mean completion length {signals.mean_length:.0f} is {growth:.2f}x the first batch's "
                   f"{signals.reference_length:.0f} > max_length_growth {config.max_length_growth:g}")
    if config.max_grad_norm and not signals.grad_norm <= config.max_grad_norm:
        out.append(f"gradient norm {signals.grad_norm:.4g} > max_grad_norm {config.max_grad_norm:g}")
    if config.max_clip_fraction and signals.clip_fraction > config.max_clip_fraction:
        out.append(f"clip fraction {signals.clip_fraction:.3f} > max_clip_fraction {config.max_clip_fraction:g}")
    return out
