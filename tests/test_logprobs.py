"""token_logprobs (the LM head log-probs a vocabulary block at a time) and the learner's CPU attention, against plain torch."""

import pytest
import torch
import torch.nn.functional as F

from flywheel.learner import attention
from flywheel.learner.logprobs import policy_kl_from_hidden, token_logprobs
from flywheel.learner.loss import policy_kl


def reference(hidden_ND, weight_VD, targets_N, temperature_N):
    logits_NV = (hidden_ND @ weight_VD.t()) / temperature_N[:, None]
    logp_NV = torch.log_softmax(logits_NV, -1)
    entropy_N = -(logp_NV.exp() * logp_NV).sum(-1)
    return logp_NV.gather(-1, targets_N[:, None]).squeeze(-1), entropy_N


@pytest.mark.parametrize("block", [1, 3, 4, 64])  # one vocabulary row at a time, blocks that do not divide V, one block
def test_logprobs_entropies_and_gradients_equal_a_full_log_softmax(block):
    torch.manual_seed(0)
    N, D, V = 7, 5, 11
    hidden = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    temperature = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.7, 1.3, 1.0], dtype=torch.float64)
    g_N = torch.randn(N, dtype=torch.float64)

    logp, entropy = token_logprobs(hidden, weight, targets, temperature, with_entropy=True, block=block)
    (logp.double() * g_N).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref_logp, ref_entropy = reference(hidden, weight, targets, temperature)
    (ref_logp * g_N).sum().backward()

    # the log-softmax runs in fp32 whatever the input dtype (as the trainer's logits are fp32)
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-5, rtol=0)
    assert not entropy.requires_grad


def test_without_entropy_none_and_a_frozen_weight_gets_no_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(6, 3)
    logp, entropy = token_logprobs(hidden, weight, torch.tensor([0, 5, 2, 2]), torch.ones(4))
    logp.sum().backward()
    assert entropy is None and weight.grad is None and hidden.grad.shape == (4, 3)


@pytest.mark.parametrize("block", [1, 4, 64])
def test_policy_kl_from_hidden_equals_the_kl_of_full_log_softmaxes(block):
    torch.manual_seed(0)
    N, D, V = 6, 5, 11
    before, after = torch.randn(N, D), torch.randn(N, D) * 2  # the second far from the first: large KLs
    weight = torch.randn(V, D)
    temperature = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.7, 1.3])

    kl_N = policy_kl_from_hidden(before, after, weight, temperature, block=block)

    def logp_NV(hidden_ND):
        return torch.log_softmax((hidden_ND.double() @ weight.double().t()) / temperature.double()[:, None], -1)
    torch.testing.assert_close(kl_N.double(), policy_kl(logp_NV(before), logp_NV(after)), atol=1e-5, rtol=1e-5)
    assert kl_N.min() > 0.1
    torch.testing.assert_close(policy_kl_from_hidden(before, before, weight, temperature, block=block),
                               torch.zeros(N), atol=1e-6, rtol=0)
    # one small step's KL (~1e-7 here), below fp32's rounding of the logits' log-sum-exp, is still measured
    nudged = before + torch.randn(N, D) * 1e-3
    small_N = policy_kl_from_hidden(before, nudged, weight, temperature, block=block)
    torch.testing.assert_close(small_N.double(), policy_kl(logp_NV(before), logp_NV(nudged)), atol=1e-10, rtol=1e-2)


def eager_mask(pad_B, L):
    """transformers' additive causal mask with left padding: 0 where a query may attend, else the minimum."""
    allowed_BLL = torch.ones(L, L, dtype=torch.bool).tril()[None] & ~pad_B[:, None, :]
    return torch.zeros(allowed_BLL.shape).masked_fill(~allowed_BLL, torch.finfo(torch.float32).min)[:, None]


class _Attention(torch.nn.Module):
    is_causal, num_key_value_groups = True, 2


@pytest.mark.parametrize("keys", [12, attention.PLAIN_MAX_KEYS + 1])  # plain ops, and sdpa past the limit
def test_cpu_attention_equals_sdpa_on_real_rows_forward_and_backward(keys):
    torch.manual_seed(0)
    B, H, K, D = 3, 4, 2, 8
    pad_BL = torch.zeros(B, keys, dtype=torch.bool)
    pad_BL[1, :3] = pad_BL[2, :keys - 2] = True  # left padding, one row nearly all of it
    mask = eager_mask(pad_BL, keys)
    q = torch.randn(B, H, keys, D, requires_grad=True)
    k, v = (torch.randn(B, K, keys, D, requires_grad=True) for _ in range(2))
    g = torch.randn(B, keys, H, D) * ~pad_BL[:, :, None, None]  # real query rows only

    out, weights = attention.attention(_Attention(), q, k, v, mask, scaling=D ** -0.5)
    (out * g).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         attn_mask=mask).transpose(1, 2)
    (ref * g).sum().backward()

    real = ~pad_BL
    assert weights is None
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
