"""The LM head of the Fisher penalty's step, chunk by chunk of positions: no (N, V) tensor outlives a chunk.

The logits path keeps about five (N, V) float32 tensors from the forward to the outer backward (the log-softmax, the
scattered score gradient, its log-softmax backward, ...): 1 GB at 1024 tokens and a 49k vocabulary. :class:`FusedHead`
computes what the penalty needs from the LM head (cross-entropy, the y' draws, the score gradient w.r.t. the final
hidden states) over chunks of rows and recomputes the logits in its backward. Pure torch.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

HEAD_CHUNK_ROWS = 128
"""Predicted positions per chunk of :class:`FusedHead` (128 x a 49k vocabulary: 25 MB of float32 logits)."""


def plain_head(base: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (V, D), bias) when the LM head is one ``nn.Linear`` with whole weights and no logit transform, the
    case :class:`FusedHead` handles; ``None`` otherwise (adapters on the head, ``logit_scale``, soft-capping,
    DeepSpeed ZeRO-3 or DTensor weights), where the penalty takes the logits path."""
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return None
    text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    scale = getattr(text_config, "logit_scale", None)
    if (scale is not None and scale != 1) or getattr(text_config, "final_logit_softcapping", None):
        return None
    weight = head.weight
    if hasattr(weight, "ds_id") or type(weight) is not torch.nn.Parameter or weight.dim() != 2:
        return None
    return weight, head.bias


class FusedHead(torch.autograd.Function):
    """(h (N, D), W (V, D), b) -> (nll_sum, dh (m, N, D), entropy_sum, correct), chunk by chunk of rows (the last
    two only with ``with_stats``, zeros otherwise).

    With z = h W^T + b (float32), p = softmax(z) and draws y'_s ~ p (or uniform, with signs sigma): ``dh_s =
    r_s W``, ``r_s = sigma_s (e_{y'_s} - p)``, is d/dh of the summed token-F / logit-F scores (their first
    derivatives agree); ``nll_sum`` is the cross-entropy against ``targets``. The backward recomputes z per chunk:

        grad_z  = g_nll (p - e_t)  -  sum_s sigma_s p * (a_s - rowsum(p * a_s)),   a_s = g_dh_s W^T   (token-F only:
                                                                                   logit-F stops the gradient at p)
        grad_h  = grad_z W,        grad_W = grad_z^T h + sum_s r_s^T g_dh_s,       grad_b = colsum(grad_z)

    so no (N, V) tensor outlives a chunk: the logits path keeps about five of them until the outer backward (1 GB
    at 1024 tokens and a 49k vocabulary). One more product than the logits path (z again in the backward).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, kind, num_samples, sampling, generator, with_stats=False):
        N, V = h.shape[0], weight.shape[0]
        if sampling == "uniform":
            y = torch.randint(V, (N, num_samples), device=h.device, generator=generator)  # (N, m)
            signs = torch.randint(2, (N, num_samples), device=h.device, generator=generator) * 2 - 1
        else:
            u = torch.rand(
                N, num_samples, device=h.device, generator=generator
            )  # (N, m), as _draw_labels draws
            y, signs = torch.empty(N, num_samples, dtype=torch.long, device=h.device), None
        dh = h.new_empty(num_samples, *h.shape)  # (m, N, D)
        acc = torch.promote_types(h.dtype, torch.float32)
        nll, ent, correct = (h.new_zeros((), dtype=acc) for _ in range(3))
        for c0 in range(0, N, HEAD_CHUNK_ROWS):
            c1 = min(c0 + HEAD_CHUNK_ROWS, N)
            z = _float_logits(torch.nn.functional.linear(h[c0:c1], weight, bias))  # (R, V)
            logp = torch.log_softmax(z, dim=-1)
            p = logp.exp()
            if targets is not None:
                t = targets[c0:c1].unsqueeze(1)
                nll -= logp.gather(1, t).sum()
                if with_stats:
                    correct += (z.argmax(-1, keepdim=True) == t).sum()
                    ent -= (p * logp).sum()
            if signs is None:
                cdf = p.cumsum(dim=-1)
                y[c0:c1] = torch.searchsorted(cdf, u[c0:c1] * cdf[:, -1:], right=True).clamp_(max=V - 1)
            for s in range(num_samples):
                r = _score_grad(p, y[c0:c1, s], None if signs is None else signs[c0:c1, s])
                dh[s, c0:c1] = r.to(weight.dtype) @ weight
        ctx.save_for_backward(h, weight, bias, targets, y, signs)
        ctx.kind = kind
        ctx.mark_non_differentiable(ent, correct)
        return nll, dh, ent, correct

    @staticmethod
    @once_differentiable
    def backward(ctx, g_nll, g_dh, _ent, _correct):
        h, weight, bias, targets, y, signs = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N, m = h.shape[0], y.shape[1]
        grad_h = torch.zeros_like(h) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=h.device) if need_b else None
        for c0 in range(0, N, HEAD_CHUNK_ROWS):
            c1 = min(c0 + HEAD_CHUNK_ROWS, N)
            hc = h[c0:c1]
            p = torch.softmax(_float_logits(torch.nn.functional.linear(hc, weight, bias)), dim=-1)  # (R, V)
            if g_nll is not None and targets is not None:  # g_nll (p - e_t)
                gz = (p * g_nll).scatter_add_(1, targets[c0:c1].unsqueeze(1), (-g_nll).expand(c1 - c0, 1))
            else:
                gz = torch.zeros_like(p)
            if g_dh is not None:
                for s in range(m):
                    g = g_dh[s, c0:c1]  # (R, D)
                    sign = None if signs is None else signs[c0:c1, s]
                    if need_w:
                        r = _score_grad(p, y[c0:c1, s], sign)
                        grad_w.addmm_(r.t(), g.to(acc))
                    if ctx.kind == "token":
                        a = _float_logits(g @ weight.t())  # (R, V)
                        a.sub_((p * a).sum(-1, keepdim=True)).mul_(p)
                        gz.sub_(a if sign is None else a * sign.unsqueeze(1))
            if need_h:
                grad_h[c0:c1] = gz.to(weight.dtype) @ weight
            if need_w:
                grad_w.addmm_(gz.t(), hc.to(acc))
            if need_b:
                grad_b += gz.sum(0)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            *(None,) * 6,
        )


def _float_logits(z: torch.Tensor) -> torch.Tensor:
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _score_grad(p: torch.Tensor, y: torch.Tensor, sign: torch.Tensor | None) -> torch.Tensor:
    """d score / d z = sigma (e_y - p) for rows of p (R, V) and draws y (R,)."""
    r = p.neg().scatter_add_(1, y.unsqueeze(1), torch.ones_like(p[:, :1]))
    return r if sign is None else r.mul_(sign.unsqueeze(1))
