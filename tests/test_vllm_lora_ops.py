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
