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

`add_lora_linear` replaces the CPU wrapper's method of that name, which every LoRA linear
layer calls once per forward: vLLM's shrinks each output slice (q, k, v; gate, up) into a
fresh fp32 buffer, then expands each, about twenty small torch calls per slice, 210 slices
per SmolLM2 decode step. At decode sizes each torch call costs 25-100 us whatever its
arithmetic, so here a layer's call is two matmuls over all its slices and, in a small
mixed batch, all its adapter slots (`_SlotStack`). The layout is a copy of the slots'
weights (B^T block-diagonal, so about slices x the B memory), rebuilt when vLLM loads or
clears a slot.

A batch in which every token has the same adapter (one agent's traffic, or one agent's turn)
skips the LoRA matmuls altogether: `merged_apply_sync` runs the layer on a merged weight
W + B A kept per slot (`_MergedLayer`), so such a batch costs what the base model costs. The
merged weights are copies (the base weight, read back once, and one per slot used), spent from
a budget of FLYWHEEL_VLLM_LORA_MERGE_GB (default 2 GiB, about 5x SmolLM2's linears; 0 turns
merging off); layers past the budget take the two-matmul path, as do layers whose merge waits
its turn (merging takes at most a quarter of the engine's time).

Installed into vLLM by `flywheel.vllm_plugin.register`.
"""

from __future__ import annotations

import os
import time
import weakref

import torch


class _Batch:
    """What every LoRA layer of one forward pass derives from the same token indices."""

    def __init__(self, indices: torch.Tensor):
        self.indices = indices.clone()
        slots = [s for s in torch.unique(indices).tolist() if s >= 0]
        if len(slots) == 1 and bool((indices == slots[0]).all()):
            self.groups = [(slots[0], None)]
        else:
            self.groups = [(s, (indices == s).nonzero().squeeze(1)) for s in slots]
        self._masks: dict[tuple, torch.Tensor] = {}

    @property
    def only_slot(self) -> int | None:
        """The slot of every token, if they all have one (the common case), else None."""
        return self.groups[0][0] if len(self.groups) == 1 and self.groups[0][1] is None else None

    def slot_mask(self, slots: int, rank_rows: int, dtype: torch.dtype) -> torch.Tensor:
        """(T, slots x K) ones where column block s belongs to token t's slot; zeros on index -1 rows."""
        if (slots, rank_rows, dtype) not in self._masks:
            mask_TS = (self.indices[:, None] == torch.arange(slots)[None, :]).to(dtype)
            self._masks[slots, rank_rows, dtype] = mask_TS.repeat_interleave(rank_rows, dim=1)
        return self._masks[slots, rank_rows, dtype]


_recent_batches: list[_Batch] = []  # newest last


def _batch(indices: torch.Tensor) -> _Batch:
    """The batch of these indices, remembered while they repeat: every layer of a forward pass
    sees the same ones, so grouping costs one small comparison per layer instead of a
    torch.unique and a few nonzeros."""
    for seen in reversed(_recent_batches):
        if seen.indices.shape == indices.shape and torch.equal(seen.indices, indices):
            return seen
    _recent_batches.append(_Batch(indices))
    del _recent_batches[:-4]
    return _recent_batches[-1]


def lora_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """(T, out) = inputs (T, in) @ weights[indices[t]].T per row; rows with index -1 are zero.

    weights: (L, out, in) or (L, 1, out, in), the stacked adapter slots.
    """
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    n_tokens = indices.shape[0]
    x_TI = inputs[:n_tokens].to(dtype)
    batch = _batch(indices)
    if batch.only_slot is not None:
        return x_TI @ weights[batch.only_slot].to(dtype).t()
    out_TO = x_TI.new_zeros(n_tokens, weights.shape[1])
    for slot, rows in batch.groups:
        out_TO.index_copy_(0, rows, x_TI.index_select(0, rows) @ weights[slot].to(dtype).t())
    return out_TO


class _SlotStack:
    """One LoRA layer's adapter slots laid out for one shrink and one expand per call.

    For slot s, with slices i (q, k, v; or gate, up) of rank R at output offset o_i:
    a_SKI[s] stacks the slices' A (K = slices x R rows) and bt_SKO[s] is the block-diagonal
    B^T, bt_SKO[s, iR:(i+1)R, o_i:o_i+size_i] = B_i[s]^T, so x @ a_SKI[s]^T @ bt_SKO[s] is
    every slice's LoRA output side by side. `live[s]`: the slot has weights in this layer.
    """

    def __init__(self, a_stacked: tuple[torch.Tensor, ...], b_stacked: tuple[torch.Tensor, ...],
                 output_slices: tuple[int, ...]):
        slots, rank = a_stacked[0].shape[0], a_stacked[0].shape[2]
        self.a_SKI = torch.cat([a[:, 0] for a in a_stacked], dim=1)
        self.bt_SKO = a_stacked[0].new_zeros(slots, len(output_slices) * rank, sum(output_slices))
        offset = 0
        for i, (b, size) in enumerate(zip(b_stacked, output_slices)):
            self.bt_SKO[:, i * rank:(i + 1) * rank, offset:offset + size] = b[:, 0, :size].transpose(1, 2)
            offset += size
        self.live = _live_slots(a_stacked, b_stacked)


def _live_slots(a_stacked, b_stacked) -> list[bool]:
    """Per slot: whether it has nonzero A and B in this layer (vLLM zeroes the slots of layers
    an adapter does not train, and empty slots)."""
    a_any = torch.stack([a.flatten(1).any(1) for a in a_stacked]).any(0)
    b_any = torch.stack([b.flatten(1).any(1) for b in b_stacked]).any(0)
    return (a_any & b_any).tolist()


_derived: dict[tuple[str, int], tuple[tuple[torch.Tensor, ...], tuple[int, ...], object]] = {}
_DENSE_TOKENS = 256  # up to this many tokens a mixed batch runs every slot masked, in 3 calls


def _from_weights(kind: str, weights: tuple[torch.Tensor, ...], build):
    """build(), remembered until vLLM writes one of `weights` in place (that is how it loads and
    clears adapter slots; a tensor's `_version` counts such writes). The weights are held, so
    their ids, the key, cannot be reused."""
    versions = tuple(t._version for t in weights)
    held = _derived.get((kind, id(weights[0])))
    if held is None or held[0][0] is not weights[0] or held[1] != versions:
        held = _derived[kind, id(weights[0])] = (weights, versions, build())
    return held[2]


def _slot_stack(a_stacked, b_stacked, output_slices) -> _SlotStack:
    """The layer's `_SlotStack`, laid out again after vLLM writes a slot."""
    return _from_weights("stack", (*a_stacked, *b_stacked), lambda: _SlotStack(a_stacked, b_stacked, output_slices))


def add_lora_linear(wrapper, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                    lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...], *,
                    buffer=None, **kwargs) -> None:
    """`PunicaWrapperCPU.add_lora_linear`: for each token t of adapter slot k = indices[t] and
    each output slice i at column offset o_i,

        y[t, o_i : o_i + size_i] += scale * (x[t] @ A_i[k]^T) @ B_i[k]^T

    with A_i (slots, 1, rank, in) and B_i (slots, 1, size_i, rank); rows of index -1 get nothing.
    All slices at once through the layer's `_SlotStack`: a batch of one adapter is two matmuls;
    a small mixed batch (decode) runs every slot in the same two matmuls, each token's columns
    of the other slots masked to zero, because there a call costs more than the arithmetic;
    a large mixed batch (prefill) runs two matmuls per slot over its rows.
    """
    indices = wrapper.token_lora_indices
    n_tokens = indices.shape[0]
    stack = _slot_stack(lora_a_stacked, lora_b_stacked, output_slices)
    batch = _batch(indices)
    groups = [(slot, rows) for slot, rows in batch.groups if stack.live[slot]]
    if not groups:
        return
    x_TI = x.view(-1, x.shape[-1])[:n_tokens]
    y_TO = y.view(-1, y.shape[-1])[:n_tokens, :stack.bt_SKO.shape[2]]
    a_SKI, bt_SKO = stack.a_SKI.to(x_TI.dtype), stack.bt_SKO.to(y_TO.dtype)
    if len(groups) == 1 and groups[0][1] is None:
        y_TO.addmm_(x_TI @ a_SKI[groups[0][0]].t(), bt_SKO[groups[0][0]], alpha=scale)
    elif n_tokens <= _DENSE_TOKENS:
        slots, rank_rows = a_SKI.shape[0], a_SKI.shape[1]
        down_TJ = x_TI @ a_SKI.view(slots * rank_rows, -1).t()  # J = slots x K
        down_TJ.mul_(batch.slot_mask(slots, rank_rows, down_TJ.dtype))
        y_TO.addmm_(down_TJ, bt_SKO.view(slots * rank_rows, -1), alpha=scale)
    else:  # each group has its rows: a group of every row is the first case
        for slot, rows in groups:
            up_RO = (x_TI.index_select(0, rows) @ a_SKI[slot].t()) @ bt_SKO[slot]
            y_TO.index_add_(0, rows, up_RO, alpha=scale)


_MERGE_BUDGET_BYTES = int(float(os.environ.get("FLYWHEEL_VLLM_LORA_MERGE_GB", "2")) * 2**30)
_merge_spent_bytes = 0  # on base weight copies and merged weights, all layers together
# No layer merges before this time.monotonic(): after each layer's merge the engine runs
# _MERGE_IDLE_PER_BUSY times as long without merging, so a new adapter version's merge (~0.3 s
# on SmolLM2) is spread over its first second or so, each layer on the two-matmul path until its
# turn, instead of stalling one step for every request.
_merge_resume_at = 0.0
_MERGE_IDLE_PER_BUSY = 3


class _MergedLayer:
    """One LoRA layer's base weight W (O, I), read back from vLLM's prepacked linear, and per
    adapter slot a prepacked linear of W + B A (the layer's whole output, all slices)."""

    def __init__(self, weight_OI: torch.Tensor):
        self.weight_OI = weight_OI
        # slot -> (the layout merged from, held weakly; its A and B^T rows of the slot; the linear)
        self.slots: dict[int, tuple[weakref.ref, torch.Tensor, torch.Tensor, torch.nn.Module]] = {}

    @classmethod
    def read_back(cls, layer) -> "_MergedLayer":
        """The base weight through the layer's own linear: I @ W^T is W^T exactly (one nonzero
        product per output), whatever packing vLLM chose, and it keeps no weight of its own."""
        base = layer.base_layer
        eye_II = torch.eye(layer.lora_a_stacked[0].shape[-1], dtype=base.weight.dtype)
        return cls(base.cpu_linear(eye_II, base.weight, None).t().contiguous())

    def current(self, slot: int, stack: _SlotStack) -> torch.nn.Module | None:
        """The slot's merged linear if it was merged from the slot's weights in `stack` (a write
        to any slot renews the layout; the other slots' linears stay)."""
        held = self.slots.get(slot)
        if held is None:
            return None
        if held[0]() is not stack:
            if not (torch.equal(held[1], stack.a_SKI[slot]) and torch.equal(held[2], stack.bt_SKO[slot])):
                return None
            self.slots[slot] = (weakref.ref(stack), *held[1:])
        return held[3]

    def merge(self, slot: int, stack: _SlotStack) -> torch.nn.Module:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        merged_OI = self.weight_OI.to(torch.float32, copy=True)  # a copy also of an fp32 base
        rows = stack.bt_SKO.shape[2]
        merged_OI[:rows].addmm_(stack.bt_SKO[slot].t().float(), stack.a_SKI[slot].float())
        linear = torch.nn.Module()
        linear.weight = torch.nn.Parameter(merged_OI.to(self.weight_OI.dtype), requires_grad=False)
        dispatch_cpu_unquantized_gemm(linear, remove_weight=True)  # vLLM's packing for this shape
        self.slots[slot] = (weakref.ref(stack), stack.a_SKI[slot].clone(), stack.bt_SKO[slot].clone(), linear)
        return linear


def _merged_linear(layer) -> torch.nn.Module | None:
    """The merged linear for this forward's batch, or None: the batch mixes slots (or has
    base rows), the slot does not train this layer, the layer is not an unquantized CPU linear,
    its merge waits its turn, or the budget is spent."""
    global _merge_spent_bytes, _merge_resume_at
    slot = _batch(layer.punica_wrapper.token_lora_indices).only_slot
    if slot is None or not hasattr(layer.base_layer, "cpu_linear"):
        return None
    stack = _slot_stack(layer.lora_a_stacked, layer.lora_b_stacked, layer.output_slices)
    if not stack.live[slot]:
        return None
    merged = getattr(layer, "flywheel_merged", None)
    linear = merged.current(slot, stack) if merged is not None else None
    if linear is not None or time.monotonic() < _merge_resume_at:
        return linear
    copies = 2 if merged is None else 0 if slot in merged.slots else 1  # (base and) the slot's
    weight_bytes = sum(layer.output_slices) * layer.lora_a_stacked[0].shape[-1] * layer.base_layer.weight.element_size()
    if _merge_spent_bytes + copies * weight_bytes > _MERGE_BUDGET_BYTES:
        return None
    _merge_spent_bytes += copies * weight_bytes
    started = time.monotonic()
    if merged is None:
        merged = layer.flywheel_merged = _MergedLayer.read_back(layer)
    linear = merged.merge(slot, stack)
    finished = time.monotonic()
    _merge_resume_at = finished + _MERGE_IDLE_PER_BUSY * (finished - started)
    return linear


def merged_apply_sync(apply_sync):
    """vLLM's `BaseLinearLayerWithLoRA._apply_sync` (base linear, then `add_lora_linear`), run as
    one linear on the slot's merged weight when every token of the batch has that slot."""

    def apply_sync_merged(layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        linear = _merged_linear(layer)
        if linear is None:
            return apply_sync(layer, x, bias)
        return linear.cpu_linear(x, linear.weight, bias)

    return apply_sync_merged


def skipping_dead_logits(add_lora_logits):
    """vLLM's `PunicaWrapperCPU.add_lora_logits`, skipped when no slot in the batch has LM-head
    weights (adapters that do not train the LM head: nearly all). It would otherwise add a zero
    (T, vocab) delta at every step, about a fifth of a SmolLM2 decode step."""

    def add_lora_logits_if_live(wrapper, y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs):
        live = _from_weights("live", (lora_a_stacked, lora_b_stacked),
                             lambda: _live_slots((lora_a_stacked,), (lora_b_stacked,)))
        if any(live[slot] for slot, _ in _batch(wrapper.sampler_indices).groups):
            return add_lora_logits(wrapper, y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs)
        return None

    return add_lora_logits_if_live


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


# vLLM's module-level ops, which the CPU wrapper's other methods (embeddings, logits) still call
OPS = {f.__name__: f for f in (bgmv_shrink, bgmv_expand, bgmv_expand_slice, sgmv_shrink, sgmv_expand,
                                sgmv_expand_slice)}
