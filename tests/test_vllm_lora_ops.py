"""The grouped LoRA ops give vLLM's torch ops' results (where the two agree on semantics)."""

import pytest
import torch

from flywheel.vllm_plugin import lora_ops as ours

reference = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")


def _case(seed, n_tokens=37, slots=4, d_in=64, rank=8, d_out=96, indices=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, d_in, generator=g)
    a = torch.randn(slots, 1, rank, d_in, generator=g)
    b = torch.randn(slots, 1, d_out, rank, generator=g)
    idx = indices if indices is not None else torch.randint(0, slots, (n_tokens,), generator=g)
    return x, a, b, idx


@pytest.mark.parametrize("indices", [None, torch.full((37,), 2)], ids=["mixed", "one-adapter"])
def test_shrink_and_expand_match_the_originals(indices):
    x, a, b, idx = _case(0, indices=indices)
    for fn in ("bgmv_shrink",):
        want, got = torch.zeros(37, 8), torch.zeros(37, 8)
        getattr(reference, fn)(x, a, want, idx, 0.5)
        getattr(ours, fn)(x, a, got, idx, 0.5)
        torch.testing.assert_close(got, want)
    y = torch.randn(37, 8)
    for add in (True, False):
        want, got = torch.ones(37, 96), torch.ones(37, 96)
        reference.bgmv_expand(y, b, want, idx, add)
        ours.bgmv_expand(y, b, got, idx, add)
        torch.testing.assert_close(got, want)
        want, got = torch.ones(37, 200), torch.ones(37, 200)
        reference.bgmv_expand_slice(y, b, want, idx, 50, 96, add)
        ours.bgmv_expand_slice(y, b, got, idx, 50, 96, add)
        torch.testing.assert_close(got, want)


def test_prefill_variants_explode_per_sequence_indices():
    x, a, b, _ = _case(1, n_tokens=10)
    seq_lens, seq_idx = torch.tensor([3, 7]), torch.tensor([1, 3])
    args = (torch.tensor([0, 3]), seq_lens, seq_idx, 2, 7, 10)
    want, got = torch.zeros(10, 8), torch.zeros(10, 8)
    reference.sgmv_shrink(x, a, want, *args, 2.0)
    ours.sgmv_shrink(x, a, got, *args, 2.0)
    torch.testing.assert_close(got, want)
    want_out, got_out = torch.zeros(10, 96), torch.zeros(10, 96)
    reference.sgmv_expand(want, b, want_out, *args, True)
    ours.sgmv_expand(got, b, got_out, *args, True)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-4)  # fp32 summation order


def test_tokens_without_an_adapter_get_no_lora_contribution():
    x, a, _, _ = _case(2, n_tokens=6)
    idx = torch.tensor([-1, 0, -1, 1, 1, -1])
    got = torch.full((6, 8), 7.0)
    ours.bgmv_shrink(x, a, got, idx, 1.0)
    assert torch.equal(got[idx == -1], torch.zeros(3, 8))
    torch.testing.assert_close(got[1], x[1] @ a[0, 0].t())


def test_bf16_weights_are_used_in_the_output_dtype():
    x, a, _, idx = _case(3)
    got = torch.zeros(37, 8, dtype=torch.bfloat16)
    want = torch.zeros(37, 8, dtype=torch.bfloat16)
    reference.bgmv_shrink(x.bfloat16(), a.bfloat16(), want, idx, 1.0)
    ours.bgmv_shrink(x.bfloat16(), a.bfloat16(), got, idx, 1.0)
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)



class _Wrapper:
    """What the replaced methods read of vLLM's CPU punica wrapper."""

    def __init__(self, token_lora_indices):
        self.token_lora_indices = self.sampler_indices = token_lora_indices


def _reference_add_lora_linear(y, x, a, b, indices, scale, slices):
    """vLLM's add_lora_linear over its reference ops: shrink into an fp32 buffer, expand each slice;
    on the rows with an adapter (vLLM's ops would index slot -1 for the others)."""
    kept = indices >= 0
    expected, offset = y.clone(), 0
    for a_i, b_i, size in zip(a, b, slices):
        down = torch.zeros(int(kept.sum()), a_i.shape[2])
        reference.bgmv_shrink(x[kept], a_i, down, indices[kept], scale)
        up = torch.zeros(int(kept.sum()), size, dtype=y.dtype)
        reference.bgmv_expand(down, b_i, up, indices[kept], False)
        expected[kept, offset:offset + size] += up
        offset += size
    return expected


def _qkv_case(n_tokens, dtype=torch.float32, seed=4):
    g = torch.Generator().manual_seed(seed)
    slices = (96, 32, 32)  # q, k, v
    x = torch.randn(n_tokens, 64, generator=g).to(dtype)
    a = tuple(torch.randn(4, 1, 8, 64, generator=g).to(dtype) for _ in slices)
    b = tuple(torch.randn(4, 1, size, 8, generator=g).to(dtype) for size in slices)
    y = torch.randn(n_tokens, sum(slices), generator=g).to(dtype)
    return x, a, b, y, slices


# one adapter (two matmuls), a small mixed batch with base rows (every slot masked, decode) and
# a large one (per slot over its rows, prefill)
@pytest.mark.parametrize("indices", [torch.full((37,), 2), torch.tensor([-1, 0, 3, 3, 1] * 7 + [2, -1]),
                                     torch.tensor([-1, 0, 3, 3, 1] * 60 + [2, -1])],
                         ids=["one-adapter", "small-mixed-with-base-rows", "large-mixed-with-base-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_lora_linear_gives_vllms_shrink_then_expand_over_the_slices(indices, dtype):
    x, a, b, y, slices = _qkv_case(len(indices), dtype)
    expected = _reference_add_lora_linear(y, x, a, b, indices, 0.5, slices)
    got = y.clone()
    ours.add_lora_linear(_Wrapper(indices), got, x, a, b, 0.5, slices)
    tolerance = dict(atol=0.25, rtol=0.02) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got, expected, **tolerance)
    assert torch.equal(got[indices < 0], y[indices < 0])


def test_add_lora_linear_follows_slots_vllm_loads_and_clears_in_place():
    x, a, b, y, slices = _qkv_case(20)
    indices = torch.tensor([0, 1] * 10)
    ours.add_lora_linear(_Wrapper(indices), y.clone(), x, a, b, 1.0, slices)  # lays out the slots
    for a_i, b_i in zip(a, b):  # as vLLM's set_lora and reset_lora write them
        a_i[1].copy_(torch.randn_like(a_i[1]))
        b_i[0] = 0
    got = y.clone()
    ours.add_lora_linear(_Wrapper(indices), got, x, a, b, 1.0, slices)
    torch.testing.assert_close(got, _reference_add_lora_linear(y, x, a, b, indices, 1.0, slices), atol=1e-4, rtol=1e-5)
    assert torch.equal(got[indices == 0], y[indices == 0])  # the cleared slot adds nothing


@pytest.mark.parametrize("lm_head_trained", [False, True])
def test_lm_head_lora_runs_only_where_a_slot_in_the_batch_has_weights(lm_head_trained):
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    g = torch.Generator().manual_seed(5)
    x, logits = torch.randn(6, 64, generator=g), torch.randn(6, 300, generator=g)
    a, b = torch.zeros(4, 1, 8, 64), torch.zeros(4, 1, 300, 8)
    if lm_head_trained:
        a[2].normal_(generator=g)
        b[2].normal_(generator=g)
    vllm_method = getattr(PunicaWrapperCPU, "vllm_add_lora_logits", PunicaWrapperCPU.add_lora_logits)
    calls = []

    def vllm_add_lora_logits(*args, **kwargs):
        calls.append(args)
        return vllm_method(*args, **kwargs)

    wrapper = _Wrapper(torch.tensor([2, 2, 0, -1, 0, 0]))
    got, expected = logits.clone(), logits.clone()
    ours.skipping_dead_logits(vllm_add_lora_logits)(wrapper, got, x, a, b, 1.0)
    vllm_method(wrapper, expected, x, a, b, 1.0)
    assert len(calls) == int(lm_head_trained)
    assert torch.equal(got, expected)
    assert torch.equal(got, logits) != lm_head_trained


class _LoRALinear:
    """What `merged_apply_sync` reads of a vLLM LoRA linear layer, over a base linear packed by
    vLLM's own CPU dispatch (so the packed weight is only reachable through `cpu_linear`)."""

    def __init__(self, weight_OI, a, b, slices, indices):
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        self.base_layer = torch.nn.Module()
        self.base_layer.weight = torch.nn.Parameter(weight_OI.clone(), requires_grad=False)
        dispatch_cpu_unquantized_gemm(self.base_layer, remove_weight=True)
        self.lora_a_stacked, self.lora_b_stacked, self.output_slices = a, b, slices
        self.punica_wrapper = _Wrapper(indices)


def _unmerged_apply_sync(calls):
    """vLLM's `_apply_sync` over the reference ops: base linear, then each slice's LoRA."""

    def apply_sync(layer, x, bias=None):
        calls.append(layer)
        y = layer.base_layer.cpu_linear(x, layer.base_layer.weight, bias)
        indices = layer.punica_wrapper.token_lora_indices
        return _reference_add_lora_linear(y.float(), x.float(), tuple(a.float() for a in layer.lora_a_stacked),
                                          tuple(b.float() for b in layer.lora_b_stacked), indices, 1.0,
                                          layer.output_slices).to(y.dtype)

    return apply_sync


def _merged_case(indices, seed=6, dtype=torch.bfloat16):
    x, a, b, _, slices = _qkv_case(len(indices), dtype, seed)
    a = tuple(t * 0.1 for t in a)  # a LoRA delta the size of trained ones, small next to W
    weight_OI = torch.randn(sum(slices), x.shape[1], generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x, _LoRALinear(weight_OI, a, b, slices, indices), weight_OI


def _assert_unmerged_result(got, layer, x):
    """Within bf16 rounding of W + B A against that of W x and the LoRA term apart (both ~2^-8
    of |y|); in fp32, within summation order."""
    expected = _unmerged_apply_sync([])(layer, x)
    bf16 = got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), **(dict(atol=0.1, rtol=0.02) if bf16 else {}))
    assert (got.float() - expected.float()).abs().mean() < (0.01 if bf16 else 1e-5) * expected.float().abs().mean()


class _Clock:
    """time.monotonic for lora_ops: still unless a test moves it."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    monkeypatch.setattr(ours, "time", _Clock())
    monkeypatch.setattr(ours, "_merge_resume_at", 0.0)
    monkeypatch.setattr(ours, "_merge_spent_bytes", 0)
    monkeypatch.setattr(ours, "_MERGE_BUDGET_BYTES", 2**30)
    return ours.time


def test_the_base_weight_reads_back_exactly_through_vllms_packed_linear():
    _, layer, weight_OI = _merged_case(torch.full((5,), 1))
    assert torch.equal(ours._MergedLayer.read_back(layer).weight_OI, weight_OI)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_one_adapter_batch_runs_on_the_merged_weight_with_the_unmerged_result(clock, dtype):
    x, layer, _ = _merged_case(torch.full((37,), 2), dtype=dtype)
    calls = []
    got = ours.merged_apply_sync(_unmerged_apply_sync(calls))(layer, x)
    assert calls == []
    _assert_unmerged_result(got, layer, x)


@pytest.mark.parametrize("indices", [torch.tensor([2, 2, 1, 2]), torch.tensor([2, -1, 2, 2])],
                         ids=["two-adapters", "base-rows"])
def test_a_batch_of_more_than_one_adapter_or_with_base_rows_is_not_merged(indices):
    x, layer, _ = _merged_case(indices)
    calls = []
    got = ours.merged_apply_sync(_unmerged_apply_sync(calls))(layer, x)
    assert calls == [layer]
    assert torch.equal(got, _unmerged_apply_sync([])(layer, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_slot_written_in_place_is_merged_again_and_the_others_are_kept(clock, dtype):
    x, layer, _ = _merged_case(torch.full((8,), 2), dtype=dtype)
    apply_sync = ours.merged_apply_sync(_unmerged_apply_sync([]))
    on_slot = {slot: _Wrapper(torch.full((8,), slot)) for slot in (1, 2)}
    for slot in (2, 1):
        layer.punica_wrapper = on_slot[slot]
        apply_sync(layer, x)
    kept, old = layer.flywheel_merged.slots[2][3], layer.flywheel_merged.slots[1][3]
    for a_i in layer.lora_a_stacked:  # a new version into slot 1, as vLLM's set_lora writes it
        a_i[1].mul_(-1)
    _assert_unmerged_result(apply_sync(layer, x), layer, x)
    assert layer.flywheel_merged.slots[1][3] is not old
    layer.punica_wrapper = on_slot[2]
    _assert_unmerged_result(apply_sync(layer, x), layer, x)
    assert layer.flywheel_merged.slots[2][3] is kept


def test_past_the_memory_budget_a_layer_stays_unmerged(monkeypatch, clock):
    x, layer, weight_OI = _merged_case(torch.full((8,), 2))
    monkeypatch.setattr(ours, "_merge_spent_bytes", ours._MERGE_BUDGET_BYTES - weight_OI.nbytes)
    calls = []
    ours.merged_apply_sync(_unmerged_apply_sync(calls))(layer, x)
    assert calls == [layer] and not hasattr(layer, "flywheel_merged")


def test_merging_takes_at_most_a_quarter_of_the_time(clock):
    """A layer merged in 0.2 s holds the next merge back 3 x 0.2 s; meanwhile the next layer
    runs unmerged, with the same result."""
    x, first, _ = _merged_case(torch.full((8,), 2))
    _, second, _ = _merged_case(torch.full((8,), 2), seed=7)
    times = iter([clock.now, clock.now, clock.now + 0.2])  # its turn, the merge's start and end
    clock.monotonic = lambda: next(times, clock.now)
    calls = []
    apply_sync = ours.merged_apply_sync(_unmerged_apply_sync(calls))
    apply_sync(first, x)
    clock.now += 0.2 + 0.55
    assert torch.equal(apply_sync(second, x), _unmerged_apply_sync([])(second, x))
    assert calls == [second] and not hasattr(second, "flywheel_merged")
    clock.now += 0.1
    apply_sync(second, x)
    assert calls == [second] and 2 in second.flywheel_merged.slots
