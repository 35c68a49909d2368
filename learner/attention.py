"""Attention for the learner's short sequences on the CPU: plain matmul-softmax-matmul.

PyTorch's CPU flash-attention kernel (what `sdpa` picks there) is quick forward but slow
backward on the short rows GRPO trains on: for SmolLM2-135M's 9 heads of 64 at 160 tokens
and 6 rows, 1.0 ms forward and 12 ms backward, where the three plain ops take 2.0 and 3.5 ms.
Their cost is the (B, H, L, S) score tensor the backward keeps, so they run only while S is
at most `PLAIN_MAX_KEYS`; longer sequences, and every other device, go to transformers' sdpa.

    out = softmax(Q K^T * scaling + mask) V,   softmax in fp32, mask 0 or the dtype's minimum

Registered with transformers as the attention implementation "flywheel", with eager's
additive masks (0 or the dtype's minimum, built once per forward; sdpa takes them too).
"""

from __future__ import annotations

import torch

NAME = "flywheel"
PLAIN_MAX_KEYS = 512  # at 512 keys the kept scores are ~28 MB per layer for a 1,024-token micro-batch


def attention(module: torch.nn.Module, query_BHLD: torch.Tensor, key_BKSD: torch.Tensor, value_BKSD: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns (B, L, H, D) and no weights."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if (query_BHLD.device.type != "cpu" or key_BKSD.shape[-2] > PLAIN_MAX_KEYS or attention_mask is None
            or kwargs.get("cache") is not None):
        return sdpa_attention_forward(module, query_BHLD, key_BKSD, value_BKSD, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = query_BHLD.shape[1] // key_BKSD.shape[1]  # grouped-query attention: each K/V head serves `groups`
    key_BHSD, value_BHSD = repeat_kv(key_BKSD, groups), repeat_kv(value_BKSD, groups)
    scale = scaling if scaling is not None else query_BHLD.shape[-1] ** -0.5
    scores_BHLS = (query_BHLD @ key_BHSD.transpose(-1, -2)) * scale + attention_mask
    probs_BHLS = torch.softmax(scores_BHLS, dim=-1, dtype=torch.float32).to(query_BHLD.dtype)
    probs_BHLS = torch.nn.functional.dropout(probs_BHLS, p=dropout, training=module.training)
    return (probs_BHLS @ value_BHSD).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make "flywheel" an attention implementation transformers can load a model with."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)
    return NAME
