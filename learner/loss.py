"""The GRPO policy loss, to TRL GRPOTrainer's definitions, plus truncated importance sampling.

Pure tensor functions: no model. Shapes: B sequences (the micro-batch), T completion
tokens (padded; `mask_BT` marks real ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class LossConfig:
    """`[learner.loss]`: TRL GRPOTrainer's loss settings."""

    # lower clip: ratio >= 1 - epsilon
    epsilon: float = 0.2
    # upper clip, DAPO's clip-higher (TRL's default equals epsilon)
    epsilon_high: float = 0.28
    # token-level (dapo), per-sequence mean (grpo) or constant-normalised (dr_grpo) aggregation
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = "dapo"
    # weight of the k3 KL to the reference (base model); 0 skips the reference pass
    beta: float = 0.0
    # truncated importance sampling: min(pi_old / pi_behaviour, is_cap); 0 = off
    is_cap: float = 2.0
    # dr_grpo's constant L (sum of token losses / (sequences * L)); TRL uses its max_completion_length,
    # 512 by default. A constant, not the batch's longest completion, so a step's size does not
    # depend on which completions happen to share a batch
    dr_grpo_length: int = 512


@dataclass(frozen=True)
class Normalizer:
    """Sizes of the whole batch, so micro-batches sum to the loss of the batch."""

    sequences: int
    tokens: int
    max_completion_len: int  # dr_grpo's constant L (LossConfig.dr_grpo_length)


def k3_kl(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    delta = ref_logp_BT - logp_BT
    return torch.exp(delta) - delta - 1


def policy_kl(before_logp_BTV: torch.Tensor, after_logp_BTV: torch.Tensor) -> torch.Tensor:
    """Exact per-position KL(before || after) = sum_v p_before(v) (log p_before(v) - log p_after(v)),
    over the whole vocabulary (not a sampled-token estimate): how far one step moved the policy."""
    return (before_logp_BTV.exp() * (before_logp_BTV - after_logp_BTV)).sum(-1)


def truncated_is_weight(old_logp_BT: torch.Tensor, behavior_logp_BT: torch.Tensor, cap: float) -> torch.Tensor:
    """min(pi_old / pi_behaviour, cap): corrects for tokens sampled by an older adapter
    version, or by vLLM's slightly different numerics (Yao et al., TRL's vllm IS correction)."""
    return torch.exp(old_logp_BT - behavior_logp_BT).clamp(max=cap)


def per_token_loss(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages_B: torch.Tensor,
                   config: LossConfig, is_weight_BT: torch.Tensor | None = None,
                   ref_logp_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) [* IS weight] + beta * KL.

    ratio = exp(logp - old_logp). Returns (loss_BT, clipped_BT) where clipped marks tokens
    whose clipped term was the one taken.
    """
    ratio_BT = torch.exp(logp_BT - old_logp_BT)
    advantages_B1 = advantages_B.unsqueeze(1)
    unclipped_BT = ratio_BT * advantages_B1
    clipped_BT = torch.clamp(ratio_BT, 1 - config.epsilon, 1 + config.epsilon_high) * advantages_B1
    loss_BT = -torch.min(unclipped_BT, clipped_BT)
    if is_weight_BT is not None:
        loss_BT = loss_BT * is_weight_BT
    if config.beta != 0.0:
        if ref_logp_BT is None:
            raise ValueError("beta != 0 needs the reference logprobs")
        loss_BT = loss_BT + config.beta * k3_kl(logp_BT, ref_logp_BT)
    return loss_BT, (clipped_BT < unclipped_BT)


def aggregate(loss_BT: torch.Tensor, mask_BT: torch.Tensor, loss_type: str, norm: Normalizer) -> torch.Tensor:
    """This micro-batch's share of the batch loss (micro-batch shares add up to it).

    dapo:    sum of token losses / tokens in the batch        (token-level, TRL "dapo")
    grpo:    mean over sequences of each sequence's token mean  (TRL "grpo")
    dr_grpo: sum of token losses / (sequences * L)              (TRL "dr_grpo", L = a constant)
    """
    mask_BT = mask_BT.to(loss_BT.dtype)
    if loss_type == "dapo":
        return (loss_BT * mask_BT).sum() / max(norm.tokens, 1)
    if loss_type == "grpo":
        per_sequence_B = (loss_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1)
        return per_sequence_B.sum() / max(norm.sequences, 1)
    if loss_type == "dr_grpo":
        return (loss_BT * mask_BT).sum() / max(norm.sequences * norm.max_completion_len, 1)
    raise ValueError(f"loss_type must be dapo, grpo or dr_grpo, not {loss_type!r}")
