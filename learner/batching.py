"""Micro-batches: transitions packed by a token budget into padded tensors.

Layout as in TRL: prompts left-padded to the micro-batch's longest prompt, completions
right-padded to its longest completion, so completion token t of every row sits at
position P + t and the logits to keep are one contiguous slice.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch

from flywheel.learner.advantages import Scored


@dataclass(frozen=True)
class MicroBatch:
    input_ids_BL: torch.Tensor  # (B, P + T)
    attention_mask_BL: torch.Tensor  # (B, P + T)
    position_ids_BL: torch.Tensor  # (B, P + T): real tokens count from 0, as vLLM saw them
    completion_ids_BT: torch.Tensor  # (B, T)
    completion_mask_BT: torch.Tensor  # (B, T) 1 = a real completion token
    behavior_logp_BT: torch.Tensor  # (B, T) vLLM's logprobs (0 on padding)
    advantages_B: torch.Tensor  # (B,)
    temperature_B: torch.Tensor  # (B,)
    prompt_len: int  # P

    @property
    def padded_tokens(self) -> int:
        return self.input_ids_BL.numel()

    def to(self, device: torch.device) -> MicroBatch:
        """This micro-batch with its tensors on `device` (the same tensors where they already are)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def pack(items: Sequence[Scored], token_budget: int) -> list[list[Scored]]:
    """Group items (sorted by length, so rows in a group pad little) into micro-batches whose
    padded size, rows x (longest prompt + longest completion), stays within `token_budget`
    (a single longer item still gets its own micro-batch)."""
    ordered = sorted(items, key=lambda s: (len(s.transition.prompt_ids), len(s.transition.completion_ids)))
    groups: list[list[Scored]] = []
    current: list[Scored] = []
    longest_prompt = longest_completion = 0
    for item in ordered:
        p = max(longest_prompt, len(item.transition.prompt_ids))
        c = max(longest_completion, len(item.transition.completion_ids))
        if current and (len(current) + 1) * (p + c) > token_budget:
            groups.append(current)
            current, p, c = [], len(item.transition.prompt_ids), len(item.transition.completion_ids)
        current.append(item)
        longest_prompt, longest_completion = p, c
    if current:
        groups.append(current)
    return groups


def collate(items: Sequence[Scored], pad_id: int) -> MicroBatch:
    n = len(items)
    P = max(len(s.transition.prompt_ids) for s in items)
    T = max(len(s.transition.completion_ids) for s in items)
    input_ids_BL = torch.full((n, P + T), pad_id, dtype=torch.long)
    attention_mask_BL = torch.zeros((n, P + T), dtype=torch.long)
    behavior_BT = torch.zeros((n, T), dtype=torch.float32)
    for row, item in enumerate(items):
        t = item.transition
        p, c = len(t.prompt_ids), len(t.completion_ids)
        input_ids_BL[row, P - p:P] = torch.tensor(t.prompt_ids)
        input_ids_BL[row, P:P + c] = torch.tensor(t.completion_ids)
        attention_mask_BL[row, P - p:P + c] = 1
        behavior_BT[row, :c] = torch.tensor(t.behavior_logprobs)
    position_ids_BL = (attention_mask_BL.cumsum(-1) - 1).clamp(min=0)
    return MicroBatch(
        input_ids_BL=input_ids_BL,
        attention_mask_BL=attention_mask_BL,
        position_ids_BL=position_ids_BL,
        completion_ids_BT=input_ids_BL[:, P:],
        completion_mask_BT=attention_mask_BL[:, P:],
        behavior_logp_BT=behavior_BT,
        advantages_B=torch.tensor([s.advantage for s in items], dtype=torch.float32),
        temperature_B=torch.tensor([s.transition.temperature for s in items], dtype=torch.float32),
        prompt_len=P,
    )
