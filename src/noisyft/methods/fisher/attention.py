"""Scaled dot-product attention with an explicit, memory-lean double backward, for the Fisher penalty's forward.

The penalty differentiates a gradient, so the attention must be differentiable twice. SDPA's math backend is, but
its autograd graph keeps the (B, H, L, S) probabilities and, under ``create_graph=True``, several more L x S
tensors per layer until the outer backward: at 1024 tokens they are most of the penalty step's memory and a large
share of its time (elementwise work on L x S tensors). Here:

* :class:`_Attention` runs the forward with the fused SDPA kernel (no L x S tensor kept) and saves Q, K, V only;
* its backward is :class:`_AttentionBackward`, a function of (Q, K, V, dO) that recomputes P and returns
  (dQ, dK, dV); it saves Q, K, V, dO only;
* the backward of that (the double backward) is written out below, recomputing P once more: with upstream
  gradients (gQ, gK, gV) of (dQ, dK, dV) and ``S = scale Q K^T + M``, ``P = softmax(S)``, ``dP = dO V^T``,
  ``D = rowsum(P * dP)``, ``dS = P * (dP - D)``:

      G   = scale (gQ K^T + Q gK^T)                   upstream gradient of dS       (L, S)
      c   = rowsum(G * P)
      gdP = P * (G - c)                               through dS = softmax-backward(dP)
      gP  = dO gV^T + G * (dP - D) - c dP             through dV = P^T dO and dS
      gS  = P * (gP - rowsum(P * gP))                 through P = softmax(S)
      grad Q  = scale (dS gK + gS K)
      grad K  = scale (dS^T gQ + gS^T Q)
      grad V  = gdP^T dO
      grad dO = P gV + gdP V

Every L x S tensor lives only inside one layer's call, so the penalty step keeps O(L d) per layer, like the plain
step. Fully masked rows (left padding) give zero probabilities, as SDPA's math backend does. Dropout on the
attention probabilities and masks that require grad fall back to SDPA's math backend. Tested against math SDPA
(first and second derivatives, causal, padding, GQA) in ``tests/test_fisher_attention.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

_SDPA = F.scaled_dot_product_attention


def _additive_mask(mask, is_causal: bool, L: int, S: int, like: torch.Tensor) -> torch.Tensor | None:
    """A float mask to add to the scores (0 or -inf), or None; ``is_causal`` is SDPA's upper-left causal mask."""
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=like.device).tril()
        if mask is None:
            mask = causal
        elif mask.dtype == torch.bool:
            mask = mask & causal
        else:
            mask = mask.masked_fill(~causal, float("-inf"))
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill_(~mask, float("-inf"))


def _probs(q, k, mask, scale) -> torch.Tensor:
    """softmax(scale q k^T + mask) in float32 at least, (B, H, L, S); fully masked rows give zeros."""
    s = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)  # (B, H, L, S)
    if mask is not None:
        s = s.add_(mask)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = s.sub_(m).exp_()
    z = p.sum(dim=-1, keepdim=True)
    return p.div_(torch.where(z > 0, z, torch.ones_like(z)))


def _up(*tensors):
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [None if t is None else t.to(dtype) for t in tensors]


class _AttentionBackward(torch.autograd.Function):
    """(Q, K, V, dO) -> (dQ, dK, dV) of softmax attention, with the explicit backward in the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, do, attn_mask, is_causal, scale):
        qf, kf, vf, dof = _up(q, k, v, do)
        mask = _additive_mask(attn_mask, is_causal, q.shape[-2], k.shape[-2], qf)
        p = _probs(qf, kf, mask, scale)  # (B, H, L, S)
        dv = torch.matmul(p.transpose(-2, -1), dof)  # (B, H, S, E)
        dp = torch.matmul(dof, vf.transpose(-2, -1))  # (B, H, L, S)
        ds = dp.sub_((p * dp).sum(-1, keepdim=True)).mul_(p).mul_(scale)  # scale * dS
        dq = torch.matmul(ds, kf)  # (B, H, L, E)
        dk = torch.matmul(ds.transpose(-2, -1), qf)  # (B, H, S, E)
        ctx.save_for_backward(q, k, v, do, attn_mask)  # the caller's mask: one tensor shared by every layer
        ctx.scale, ctx.is_causal = scale, is_causal
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, gq, gk, gv):
        q, k, v, do, attn_mask = ctx.saved_tensors
        scale = ctx.scale
        qf, kf, vf, dof = _up(q, k, v, do)
        mask = _additive_mask(attn_mask, ctx.is_causal, q.shape[-2], k.shape[-2], qf)
        gq, gk, gv = (
            torch.zeros_like(t) if g is None else g.to(t.dtype) for g, t in ((gq, qf), (gk, kf), (gv, vf))
        )
        p = _probs(qf, kf, mask, scale)  # (B, H, L, S)
        dp = torch.matmul(dof, vf.transpose(-2, -1))  # (B, H, L, S)
        dpd = dp - (p * dp).sum(-1, keepdim=True)  # dP - D
        ds = p * dpd  # dS
        g = (
            torch.matmul(gq, kf.transpose(-2, -1)).add_(torch.matmul(qf, gk.transpose(-2, -1))).mul_(scale)
        )  # G
        c = (g * p).sum(-1, keepdim=True)  # (B, H, L, 1)
        gdp = (g - c).mul_(p)  # (B, H, L, S)
        gp = torch.matmul(dof, gv.transpose(-2, -1)).add_(g.mul_(dpd)).sub_(dp.mul_(c))  # gP
        gs = (gp - (p * gp).sum(-1, keepdim=True)).mul_(p).mul_(scale)  # scale * gS
        grad_q = torch.matmul(ds, gk).mul_(scale).add_(torch.matmul(gs, kf))
        grad_k = (
            torch.matmul(ds.transpose(-2, -1), gq).mul_(scale).add_(torch.matmul(gs.transpose(-2, -1), qf))
        )
        grad_v = torch.matmul(gdp.transpose(-2, -1), dof)
        grad_do = torch.matmul(p, gv).add_(torch.matmul(gdp, vf))
        return (
            grad_q.to(q.dtype),
            grad_k.to(k.dtype),
            grad_v.to(v.dtype),
            grad_do.to(do.dtype),
            None,
            None,
            None,
        )


class _Attention(torch.autograd.Function):
    """softmax(scale Q K^T + M) V by the fused SDPA kernel; backward through :class:`_AttentionBackward`."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale):
        # (B, H, L, E), fused kernel, nothing L x S kept
        out = _SDPA(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        ctx.save_for_backward(q, k, v, attn_mask)
        ctx.scale, ctx.is_causal = scale, is_causal
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, attn_mask = ctx.saved_tensors
        dq, dk, dv = _AttentionBackward.apply(q, k, v, do, attn_mask, ctx.is_causal, ctx.scale)
        return dq, dk, dv, None, None, None


def attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``'s signature and result, with the double backward above."""
    needs_math = dropout_p > 0 or (isinstance(attn_mask, torch.Tensor) and attn_mask.requires_grad)
    if needs_math:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return _SDPA(
                query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
            )
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    return _Attention.apply(query, key, value, attn_mask, bool(is_causal), scale)


class FusedDoubleBackwardSDPA(TorchFunctionMode):
    """Within the body, ``F.scaled_dot_product_attention`` calls go to :func:`attention`; re-enterable (checkpoint
    recomputation may enter it again)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return attention(*args, **kwargs)
        return func(*args, **kwargs)
