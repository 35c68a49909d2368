"""Token log-probs straight from the last hidden states, a chunk of positions at a time.

For position n with final hidden state h_n, the LM head W (V, D), the sampled token y_n and
the call's sampling temperature tau_n:

    z_n = (W h_n) / tau_n
    logp_n = z_n[y_n] - logsumexp(z_n)
    entropy_n = -sum_v p_nv log p_nv,   p_n = softmax(z_n)

and in the backward, with g_n = dL/dlogp_n:

    dL/dz_n = g_n (onehot(y_n) - p_n),   dL/dh_n = W^T dL/dz_n / tau_n

Computed as one autograd graph, every elementwise step of the log-softmax allocates and
walks a fresh (positions, V) fp32 tensor: on SmolLM2's 49,152-token vocabulary a 1,024-token
micro-batch's 384 completion positions make 75 MB per step, about a dozen of them per
forward and backward (each a fresh mmap to fault in), which was a third of the learner's
CPU step. Here only `chunk` rows of logits exist at a time, and the backward recomputes
them from h (one more (chunk, D) x (D, V) matmul) instead of keeping them. The logits are
the LM head's output in the model's dtype, then fp32, as the model's own forward gives them.
"""

from __future__ import annotations

import torch

CHUNK_POSITIONS = 64  # rows of logits at a time: 64 x 49,152 fp32 is 12.6 MB


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, inv_temperature_N, with_entropy, chunk):
        logp_N = torch.empty(hidden_ND.shape[0], dtype=torch.float32, device=hidden_ND.device)
        lse_N = torch.empty_like(logp_N)
        entropy_N = torch.empty_like(logp_N) if with_entropy else logp_N.new_empty(0)
        for start in range(0, hidden_ND.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits_CV = _logits(hidden_ND[rows], weight_VD, inv_temperature_N[rows])
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            lse_N[rows] = lse_C
            logp_N[rows] = logits_CV.gather(-1, targets_N[rows, None]).squeeze(-1) - lse_C
            if with_entropy:  # -sum_v p log p, with log p = z - logsumexp(z)
                logp_CV = logits_CV.sub_(lse_C[:, None])
                entropy_N[rows] = -(logp_CV.exp() * logp_CV).sum(-1)
        ctx.save_for_backward(hidden_ND, weight_VD, targets_N, inv_temperature_N, lse_N)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(entropy_N)
        return logp_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logp_N, _grad_entropy):
        hidden_ND, weight_VD, targets_N, inv_temperature_N, lse_N = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden_ND = torch.empty_like(hidden_ND) if want_hidden else None
        grad_weight_VD = torch.zeros_like(weight_VD, dtype=torch.float32) if want_weight else None
        for start in range(0, hidden_ND.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            logits_CV = _logits(hidden_ND[rows], weight_VD, inv_temperature_N[rows])
            # dL/dz = g (onehot - p), then through the 1/tau scaling to the LM head's output
            grad_CV = logits_CV.sub_(lse_N[rows, None]).exp_().mul_(-grad_logp_N[rows, None])
            grad_CV.scatter_add_(-1, targets_N[rows, None], grad_logp_N[rows, None])
            grad_CV = grad_CV.mul_(inv_temperature_N[rows, None]).to(weight_VD.dtype)
            if want_hidden:
                grad_hidden_ND[rows] = grad_CV @ weight_VD
            if want_weight:
                grad_weight_VD.addmm_(grad_CV.t().float(), hidden_ND[rows].float())
        if want_weight:
            grad_weight_VD = grad_weight_VD.to(weight_VD.dtype)
        return grad_hidden_ND, grad_weight_VD, None, None, None, None


def _logits(hidden_CD: torch.Tensor, weight_VD: torch.Tensor, inv_temperature_C: torch.Tensor) -> torch.Tensor:
    """(C, V) fp32 logits over temperature, the matmul in the weights' dtype."""
    return (hidden_CD.to(weight_VD.dtype) @ weight_VD.t()).float().mul_(inv_temperature_C[:, None])


def token_logprobs(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                   temperature_N: torch.Tensor, with_entropy: bool = False,
                   chunk: int = CHUNK_POSITIONS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(W h_n / tau_n)[y_n] for each of N positions (differentiable in h and W), and
    the distributions' entropies when asked (no grad), `chunk` positions at a time."""
    logp_N, entropy_N = _TokenLogprobs.apply(hidden_ND, weight_VD, targets_N,
                                             temperature_N.float().reciprocal(), with_entropy, chunk)
    return logp_N, entropy_N if with_entropy else None
