"""Token log-probs straight from the last hidden states, a chunk of positions at a time.

For position n with final hidden state h_n, the LM head W (V, D), the sampled token y_n and
the call's sampling temperature tau_n:

    z_n = (W h_n) / tau_n,   m_n = max_v z_nv,   S_n = sum_v exp(z_nv - m_n)
    logp_n = z_n[y_n] - m_n - log S_n
    entropy_n = -sum_v p_nv log p_nv = log S_n - sum_v exp(z_nv - m_n) (z_nv - m_n) / S_n

and in the backward, with g_n = dL/dlogp_n and p_n = softmax(z_n):

    dL/dz_n = g_n (onehot(y_n) - p_n),   dL/dh_n = W^T dL/dz_n / tau_n

Computed as one autograd graph, every elementwise step of the log-softmax allocates and
walks a fresh (positions, V) fp32 tensor: on SmolLM2's 49,152-token vocabulary a 1,024-token
micro-batch's 384 completion positions make 75 MB per step, about a dozen of them per
forward and backward (each a fresh mmap to fault in), which was a third of the learner's
CPU step. Here only `chunk` rows of logits exist at a time, in buffers allocated once per
call and rewritten in place (no allocator traffic, no page faults), and the backward
recomputes them from h (one more (chunk, D) x (D, V) matmul) instead of keeping them. The
logits are the LM head's output in the model's dtype, then fp32, as the model's own forward
gives them.
"""

from __future__ import annotations

import torch

CHUNK_POSITIONS = 64  # rows of logits at a time: 64 x 49,152 fp32 is 12.6 MB


class _Chunks:
    """The positions `chunk` at a time, and the buffers each chunk's logits are computed in."""

    def __init__(self, hidden_ND: torch.Tensor, weight_VD: torch.Tensor, inv_temperature_N: torch.Tensor,
                 chunk: int):
        self.hidden_ND, self.weight_VD, self.chunk = hidden_ND, weight_VD, chunk
        # temperature 1 everywhere (the common case) skips a pass over every chunk's logits
        self.inv_temperature_N = inv_temperature_N if bool((inv_temperature_N != 1).any()) else None
        rows, vocab = min(chunk, hidden_ND.shape[0]), weight_VD.shape[0]
        self.logits_CV = torch.empty(rows, vocab, dtype=torch.float32, device=hidden_ND.device)
        # the matmul's own output when the head is not fp32
        self.low_CV = (None if weight_VD.dtype == torch.float32
                       else torch.empty(rows, vocab, dtype=weight_VD.dtype, device=hidden_ND.device))

    def __iter__(self):
        for start in range(0, self.hidden_ND.shape[0], self.chunk):
            yield slice(start, start + self.chunk)

    def logits(self, rows: slice) -> torch.Tensor:
        """(C, V) fp32 logits over temperature of the positions `rows`, in the chunk buffer."""
        hidden_CD = self.hidden_ND[rows].to(self.weight_VD.dtype)
        C = hidden_CD.shape[0]
        logits_CV = self.logits_CV[:C]
        if self.low_CV is None:
            torch.mm(hidden_CD, self.weight_VD.t(), out=logits_CV)
        else:
            logits_CV.copy_(torch.mm(hidden_CD, self.weight_VD.t(), out=self.low_CV[:C]))
        if self.inv_temperature_N is not None:
            logits_CV.mul_(self.inv_temperature_N[rows, None])
        return logits_CV


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, inv_temperature_N, with_entropy, chunk):
        logp_N = torch.empty(hidden_ND.shape[0], dtype=torch.float32, device=hidden_ND.device)
        lse_N = torch.empty_like(logp_N)
        entropy_N = torch.empty_like(logp_N) if with_entropy else logp_N.new_empty(0)
        chunks = _Chunks(hidden_ND, weight_VD, inv_temperature_N, chunk)
        scratch_CV = torch.empty_like(chunks.logits_CV)  # exp of the shifted logits (the backward needs none)
        for rows in chunks:
            shifted_CV = chunks.logits(rows)
            max_C = shifted_CV.amax(-1)
            shifted_CV.sub_(max_C[:, None])
            exp_CV = torch.exp(shifted_CV, out=scratch_CV[:shifted_CV.shape[0]])
            sum_C = exp_CV.sum(-1)
            log_sum_C = sum_C.log()
            lse_N[rows] = max_C + log_sum_C
            logp_N[rows] = shifted_CV.gather(-1, targets_N[rows, None]).squeeze(-1) - log_sum_C
            if with_entropy:
                entropy_N[rows] = log_sum_C - exp_CV.mul_(shifted_CV).sum(-1) / sum_C
        ctx.save_for_backward(hidden_ND, weight_VD, targets_N, inv_temperature_N, lse_N)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(entropy_N)
        return logp_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logp_N, _grad_entropy):
        hidden_ND, weight_VD, targets_N, inv_temperature_N, lse_N = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden_ND = hidden_ND.new_empty(hidden_ND.shape) if want_hidden else None
        grad_weight_VD = torch.zeros_like(weight_VD, dtype=torch.float32) if want_weight else None
        chunks = _Chunks(hidden_ND, weight_VD, inv_temperature_N, ctx.chunk)
        for rows in chunks:
            # dL/dz = g (onehot - p), then through the 1/tau scaling to the LM head's output
            grad_CV = chunks.logits(rows).sub_(lse_N[rows, None]).exp_().mul_(-grad_logp_N[rows, None])
            grad_CV.scatter_add_(-1, targets_N[rows, None], grad_logp_N[rows, None])
            if chunks.inv_temperature_N is not None:
                grad_CV.mul_(chunks.inv_temperature_N[rows, None])
            C = grad_CV.shape[0]
            grad_low_CV = grad_CV if chunks.low_CV is None else chunks.low_CV[:C].copy_(grad_CV)
            if want_hidden:
                grad_hidden_ND[rows] = grad_low_CV @ weight_VD
            if want_weight:
                grad_weight_VD.addmm_(grad_CV.t(), hidden_ND[rows].float())
        if want_weight:
            grad_weight_VD = grad_weight_VD.to(weight_VD.dtype)
        return grad_hidden_ND, grad_weight_VD, None, None, None, None


def token_logprobs(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                   temperature_N: torch.Tensor, with_entropy: bool = False,
                   chunk: int = CHUNK_POSITIONS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(W h_n / tau_n)[y_n] for each of N positions (differentiable in h and W), and
    the distributions' entropies when asked (no grad), `chunk` positions at a time."""
    logp_N, entropy_N = _TokenLogprobs.apply(hidden_ND, weight_VD, targets_N,
                                             temperature_N.float().reciprocal(), with_entropy, chunk)
    return logp_N, entropy_N if with_entropy else None
