"""Grouped LoRA matmuls for vLLM's CPU backend, installed as a vLLM general plugin.

vLLM's CPU LoRA ops (`vllm/lora/ops/torch_ops/lora_ops.py`) gather a copy of the
adapter's weight matrix for every token (`weights[indices]`, shape (T, out, in)) and
then run a batched matrix-vector einsum. That moves T copies of every LoRA matrix
through memory at every layer, which made adapter traffic about 10x slower than the
base model. Here each adapter present in the batch does one matmul over its own rows
(`x[rows] @ W[k].T`), which runs on oneDNN/AMX like the base model's linears.

Semantics are those of the originals, with one fix: a token whose LoRA index is -1
(no adapter, i.e. a base-model request in a mixed batch) gets no LoRA contribution,
where the originals index slot -1, the last adapter slot.

Installed into vLLM by `flywheel.vllm_plugin.register`.
"""

from __future__ import annotations

import torch

_recent_groups: list[tuple[torch.Tensor, list]] = []  # (indices, their grouping), newest last


def _slot_groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """[(slot, rows)] for each adapter slot in the batch; rows None means every row.

    Every LoRA layer of a forward pass sees the same indices, so the grouping (a
    torch.unique and a few nonzeros) is remembered and reused while the indices are equal,
    which costs one small comparison per layer instead of the grouping.
    """
    for seen, groups in reversed(_recent_groups):
        if seen.shape == indices.shape and torch.equal(seen, indices):
            return groups
    slots = [s for s in torch.unique(indices).tolist() if s >= 0]
    if len(slots) == 1 and bool((indices == slots[0]).all()):
        groups = [(slots[0], None)]
    else:
        groups = [(s, (indices == s).nonzero().squeeze(1)) for s in slots]
    _recent_groups.append((indices.clone(), groups))
    del _recent_groups[:-4]
    return groups


def lora_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """(T, out) = inputs (T, in) @ weights[indices[t]].T per row; rows with index -1 are zero.

    weights: (L, out, in) or (L, 1, out, in), the stacked adapter slots.
    """
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    n_tokens = indices.shape[0]
    x_TI = inputs[:n_tokens].to(dtype)
    groups = _slot_groups(indices)
    if len(groups) == 1 and groups[0][1] is None:  # the common case: one adapter for the whole batch
        return x_TI @ weights[groups[0][0]].to(dtype).t()
    out_TO = x_TI.new_zeros(n_tokens, weights.shape[1])
    for slot, rows in groups:
        out_TO.index_copy_(0, rows, x_TI.index_select(0, rows) @ weights[slot].to(dtype).t())
    return out_TO


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = lora_matmul(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


def _per_token(lora_indices_tensor, seq_len_tensor) -> torch.Tensor:
    """Per-sequence indices (prefill) spread over the sequences' tokens."""
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False):
    bgmv_expand(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                      lora_indices_tensor, batches, max_seq_length, token_nums, slice_offset, slice_size,
                      add_inputs=False):
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor),
                      slice_offset, slice_size, add_inputs)


OPS = {f.__name__: f for f in (bgmv_shrink, bgmv_expand, bgmv_expand_slice, sgmv_shrink, sgmv_expand,
                                sgmv_expand_slice)}
