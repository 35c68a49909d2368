"""Token log-probs straight from the last hidden states, a block of the vocabulary at a time.

For position n with final hidden state h_n, the LM head W (V, D), the sampled token y_n and
the call's sampling temperature tau_n:

    z_n = (W h_n) / tau_n,   lse_n = log sum_v exp(z_nv)
    logp_n = z_n[y_n] - lse_n
    entropy_n = -sum_v p_nv log p_nv = lse_n - sum_v p_nv z_nv

and in the backward, with g_n = dL/dlogp_n and p_n = softmax(z_n):

    dL/dz_n = g_n (onehot(y_n) - p_n),   dL/dh_n = W^T dL/dz_n / tau_n

The logits of all N positions are computed `block` vocabulary rows at a time, the
log-sum-exp and the entropy's sum online across the blocks (a running max m_n, with
S_n = sum exp(z_nv - m_n) and E_n = sum exp(z_nv - m_n) z_nv rescaled by exp(m_old - m_new)
when the max grows, as flash attention does). So each pass reads the LM head once per
micro-batch, in pieces that stay in cache, where chunking the positions read all of it
(56 MB on SmolLM2) once per chunk: on SmolLM2's 49,152-token vocabulary and a micro-batch's
384 completion positions, forward + backward went from 146 to ~90 ms. Only (N, block)
logits exist at a time, in buffers allocated once per call and rewritten in place, and the
backward recomputes them from h (one more matmul) instead of keeping them. The logits are the
LM head's output in the model's dtype, then fp32, as the model's own forward gives them.
"""

from __future__ import annotations

import torch

VOCAB_BLOCK = 1024  # vocabulary rows at a time: fastest of 512-8192 on SmolLM2 (N=384: 1.5 MB of fp32 logits)


class _Blocks:
    """The vocabulary `block` rows at a time, and the buffers each block's logits are computed in."""

    def __init__(self, hidden_ND: torch.Tensor, weight_VD: torch.Tensor, inv_temperature_N: torch.Tensor,
                 block: int):
        self.hidden_ND, self.weight_VD, self.block = hidden_ND.to(weight_VD.dtype), weight_VD, block
        # temperature 1 everywhere (the common case) skips a pass over every block's logits
        self.inv_temperature_N = inv_temperature_N if bool((inv_temperature_N != 1).any()) else None
        N, cols = hidden_ND.shape[0], min(block, weight_VD.shape[0])
        self.logits_NC = torch.empty(N, cols, dtype=torch.float32, device=hidden_ND.device)
        # the matmul's own output when the head is not fp32
        self.low_NC = (None if weight_VD.dtype == torch.float32
                       else torch.empty(N, cols, dtype=weight_VD.dtype, device=hidden_ND.device))

    def __iter__(self):
        for start in range(0, self.weight_VD.shape[0], self.block):
            yield start, min(start + self.block, self.weight_VD.shape[0])

    def logits(self, start: int, end: int) -> torch.Tensor:
        """(N, end - start) fp32 logits over temperature of the vocabulary rows start:end, in the block buffer."""
        C = end - start
        logits_NC = self.logits_NC[:, :C]
        if self.low_NC is None:
            torch.mm(self.hidden_ND, self.weight_VD[start:end].t(), out=logits_NC)
        else:
            logits_NC.copy_(torch.mm(self.hidden_ND, self.weight_VD[start:end].t(), out=self.low_NC[:, :C]))
        if self.inv_temperature_N is not None:
            logits_NC.mul_(self.inv_temperature_N[:, None])
        return logits_NC


def _in_block(targets_N: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which targets fall in the block start:end, and their column there (clamped in range for the others)."""
    return (targets_N >= start) & (targets_N < end), (targets_N - start).clamp(0, end - start - 1)[:, None]


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, inv_temperature_N, with_entropy, block):
        N = hidden_ND.shape[0]
        max_N = torch.full((N,), -torch.inf, dtype=torch.float32, device=hidden_ND.device)
        sum_N, target_N = torch.zeros_like(max_N), torch.zeros_like(max_N)
        weighted_N = torch.zeros_like(max_N)  # E_n: sum exp(z - m) z
        blocks = _Blocks(hidden_ND, weight_VD, inv_temperature_N, block)
        scratch_NC = torch.empty_like(blocks.logits_NC)  # exp(z - m)
        for start, end in blocks:
            logits_NC = blocks.logits(start, end)
            inside_N, column_N1 = _in_block(targets_N, start, end)
            target_N = torch.where(inside_N, logits_NC.gather(-1, column_N1).squeeze(-1), target_N)
            new_max_N = torch.maximum(max_N, logits_NC.amax(-1))
            rescale_N = torch.exp(max_N - new_max_N)
            exp_NC = torch.sub(logits_NC, new_max_N[:, None], out=scratch_NC[:, :end - start]).exp_()
            sum_N = sum_N * rescale_N + exp_NC.sum(-1)
            if with_entropy:
                weighted_N = weighted_N * rescale_N + exp_NC.mul_(logits_NC).sum(-1)
            max_N = new_max_N
        lse_N = max_N + sum_N.log()
        entropy_N = lse_N - weighted_N / sum_N if with_entropy else lse_N.new_empty(0)
        ctx.save_for_backward(hidden_ND, weight_VD, targets_N, inv_temperature_N, lse_N)
        ctx.block = block
        ctx.mark_non_differentiable(entropy_N)
        return target_N - lse_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logp_N, _grad_entropy):
        hidden_ND, weight_VD, targets_N, inv_temperature_N, lse_N = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden_ND = torch.zeros(hidden_ND.shape, dtype=torch.float32, device=hidden_ND.device)
        grad_weight_VD = torch.empty_like(weight_VD, dtype=torch.float32) if want_weight else None
        blocks = _Blocks(hidden_ND, weight_VD, inv_temperature_N, ctx.block)
        for start, end in blocks:
            # dL/dz = g (onehot - p), then through the 1/tau scaling to the LM head's output
            grad_NC = blocks.logits(start, end).sub_(lse_N[:, None]).exp_().mul_(-grad_logp_N[:, None])
            inside_N, column_N1 = _in_block(targets_N, start, end)
            grad_NC.scatter_add_(-1, column_N1, torch.where(inside_N, grad_logp_N, 0.0)[:, None])
            if blocks.inv_temperature_N is not None:
                grad_NC.mul_(blocks.inv_temperature_N[:, None])
            if want_hidden:
                if blocks.low_NC is None:
                    grad_hidden_ND.addmm_(grad_NC, weight_VD[start:end])
                else:
                    grad_hidden_ND += blocks.low_NC[:, :end - start].copy_(grad_NC) @ weight_VD[start:end]
            if want_weight:
                torch.mm(grad_NC.t(), hidden_ND.float(), out=grad_weight_VD[start:end])
        return (grad_hidden_ND.to(hidden_ND.dtype) if want_hidden else None,
                grad_weight_VD.to(weight_VD.dtype) if want_weight else None, None, None, None, None)


def token_logprobs(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                   temperature_N: torch.Tensor, with_entropy: bool = False,
                   block: int = VOCAB_BLOCK) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(W h_n / tau_n)[y_n] for each of N positions (differentiable in h and W), and
    the distributions' entropies when asked (no grad), `block` vocabulary rows at a time."""
    logp_N, entropy_N = _TokenLogprobs.apply(hidden_ND, weight_VD, targets_N,
                                             temperature_N.float().reciprocal(), with_entropy, block)
    return logp_N, entropy_N if with_entropy else None


def policy_kl_from_hidden(before_hidden_ND: torch.Tensor, after_hidden_ND: torch.Tensor, weight_VD: torch.Tensor,
                          temperature_N: torch.Tensor, block: int = VOCAB_BLOCK) -> torch.Tensor:
    """Exact per-position KL(before || after) over the whole vocabulary between the distributions
    two final hidden states give through the LM head (`loss.policy_kl` without the (N, V)
    log-probs), a vocabulary block at a time, no grad. With d = z_before - z_after,

        KL_n = E_p_before[d] + lse_after - lse_before
             = E_p_before[d] + log1p(E_p_before[expm1(-d)])

    The second form keeps both terms at d's size, so one small step's KL is not lost to fp32
    rounding at the logits' size; it is taken where lse_after - lse_before is small (|.| < 0.1)
    and the first form elsewhere (a large step, whose expm1 may overflow). Every sum runs online
    over the blocks, weighted by exp(z - running max) as in `token_logprobs`."""
    inv_temperature_N = temperature_N.float().reciprocal()
    before = _Blocks(before_hidden_ND, weight_VD, inv_temperature_N, block)
    after = _Blocks(after_hidden_ND, weight_VD, inv_temperature_N, block)
    max_N = torch.full((before_hidden_ND.shape[0],), -torch.inf, dtype=torch.float32, device=before_hidden_ND.device)
    after_max_N = max_N.clone()
    # sums of w = exp(z_before - max), w d, w expm1(-d), and exp(z_after - after max)
    sum_N, gap_N, shrink_N, after_sum_N = (torch.zeros_like(max_N) for _ in range(4))
    weight_NC = torch.empty_like(before.logits_NC)
    with torch.no_grad():
        for start, end in before:
            before_NC, after_NC = before.logits(start, end), after.logits(start, end)
            new_max_N = torch.maximum(after_max_N, after_NC.amax(-1))
            exp_NC = torch.sub(after_NC, new_max_N[:, None], out=weight_NC[:, :end - start]).exp_()
            after_sum_N = after_sum_N * torch.exp(after_max_N - new_max_N) + exp_NC.sum(-1)
            after_max_N = new_max_N
            new_max_N = torch.maximum(max_N, before_NC.amax(-1))
            rescale_N = torch.exp(max_N - new_max_N)
            w_NC = torch.sub(before_NC, new_max_N[:, None], out=weight_NC[:, :end - start]).exp_()
            d_NC = before_NC.sub_(after_NC)
            sum_N = sum_N * rescale_N + w_NC.sum(-1)
            gap_N = gap_N * rescale_N + (w_NC * d_NC).sum(-1)
            shrink_N = shrink_N * rescale_N + w_NC.mul_(d_NC.neg_().expm1_()).sum(-1)
            max_N = new_max_N
    log_ratio_N = (after_max_N + after_sum_N.log()) - (max_N + sum_N.log())  # lse_after - lse_before
    small_N = (log_ratio_N.abs() < 0.1) & shrink_N.isfinite()
    return gap_N / sum_N + torch.where(small_N, torch.log1p(shrink_N / sum_N), log_ratio_N)
