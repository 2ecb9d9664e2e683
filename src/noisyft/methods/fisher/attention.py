"""Scaled dot-product attention with an explicit, blocked double backward, for the Fisher penalty's forward.

The penalty differentiates a gradient, so the attention must be differentiable twice. SDPA's math backend is, but
its autograd graph keeps the (B, H, L, S) probabilities and, under ``create_graph=True``, several more L x S
tensors per layer until the outer backward, and it multiplies full L x S matrices although a causal mask zeroes
half of them. Here:

* :class:`_Attention` runs the forward with the fused SDPA kernel (no L x S tensor kept) and saves Q, K, V and the
  output (on CPU also the kernel's log-sum-exp);
* its backward, when it must itself be differentiable (the penalty's ``create_graph=True`` pass), is
  :class:`_AttentionBackward`, a function of (Q, K, V, dO) returning (dQ, dK, dV); otherwise (the outer backward
  through the forward) it is a plain first-derivative pass. On CPU both first-derivative passes run the fused
  kernel's own backward (``_scaled_dot_product_flash_attention_for_cpu_backward``, which skips masked blocks);
  elsewhere, and under autocast, the blocked pass below computes them;
* the backward of :class:`_AttentionBackward` (the double backward) is written out below, recomputing P once
  more: with upstream gradients (gQ, gK, gV) of (dQ, dK, dV) and ``S = scale Q K^T + M``, ``P = softmax(S)``,
  ``dP = dO V^T``, ``D = rowsum(P * dP)``, ``dS = P * (dP - D)``:

      G   = scale (gQ K^T + Q gK^T)                   upstream gradient of dS       (L, S)
      c   = rowsum(G * P)
      gdP = P * (G - c)                               through dS = softmax-backward(dP)
      gP  = dO gV^T + G * (dP - D) - c dP             through dV = P^T dO and dS
      gS  = P * (gP - rowsum(P * gP))                 through P = softmax(S)
      grad Q  = scale (dS gK + gS K)
      grad K  = scale (dS^T gQ + gS^T Q)
      grad V  = gdP^T dO
      grad dO = P gV + gdP V

  with ``D`` taken as ``rowsum(dO * O)`` (equal to ``rowsum(P * dP)``; L x E instead of L x S work) and G as one
  product of [gQ, Q] with [K, gK].

Both explicit passes run over blocks of query rows: every formula above is row-local except the K- and V-side
sums, which accumulate block by block. A block holds ``BLOCK_ROWS`` query rows (64: at 1024 keys, 9 heads and
float32, 2.4 MB, so its dozen elementwise passes stay near a core's cache instead of streaming L x S tensors through
memory), and it
multiplies only the key columns any of its rows can see: under a causal mask, block i of n stops at its own last
row, which skips (n - 1) / 2n of the products (44% at n = 8). Nothing of size L x S outlives one block, so the
penalty step keeps O(L d) per layer, like the plain step.

Fully masked rows (left padding) give zero probabilities, as SDPA's kernels do. Dropout on the attention
probabilities and masks that require grad fall back to SDPA's math backend. Tested against math SDPA (first and
second derivatives, causal, padding, GQA, one block and many) in ``tests/test_fisher_attention.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

_SDPA = F.scaled_dot_product_attention

BLOCK_ROWS = 64
"""Query rows per block of the explicit passes (tests lower it to force many blocks). On the 2-core CPU, 64 to 128
rows were fastest at 512 to 2048 tokens: fewer rows make small, slow matrix products, more rows fall out of cache
and skip less of a causal mask."""


# -- row blocks ------------------------------------------------------------------------------------------------------
def _allowed(attn_mask: torch.Tensor) -> torch.Tensor:
    """Bool (..., L or 1, S): which keys a query may attend to under an SDPA mask (bool, or float with -inf)."""
    return attn_mask if attn_mask.dtype == torch.bool else ~torch.isneginf(attn_mask)


def _blocks(attn_mask, is_causal: bool, L: int, S: int) -> list[tuple[int, int, int]]:
    """(r0, r1, ke) per block of query rows [r0, r1): the rows' scores need key columns [0, ke) only.

    ``is_causal`` is SDPA's upper-left causal mask: row i sees keys 0..i. An explicit mask gives each block the
    last key any of its rows (in any batch row or head) may see; a block whose rows see nothing has ke = 0.
    """
    rows = max(1, min(L, BLOCK_ROWS))
    starts = range(0, L, rows)
    if is_causal:
        return [(r0, min(r0 + rows, L), min(r0 + rows, S)) for r0 in starts]
    if attn_mask is None:
        return [(r0, min(r0 + rows, L), S) for r0 in starts]
    allowed = _allowed(attn_mask)
    allowed = allowed.reshape(-1, *allowed.shape[-2:]).any(0)  # (L or 1, S)
    cols = torch.arange(1, S + 1, device=allowed.device)
    last = (
        torch.where(allowed, cols, 0).amax(-1).expand(L)
    )  # (L,): 1 + the last key each row may see, 0: none
    pad = (-L) % rows
    per_block = torch.cat([last, last.new_zeros(pad)]).view(-1, rows).amax(-1).tolist()
    return [(r0, min(r0 + rows, L), int(ke)) for r0, ke in zip(starts, per_block, strict=True)]


def _block_mask(attn_mask, is_causal: bool, r0: int, r1: int, ke: int, like: torch.Tensor):
    """(bias to add to the block's scores or None, rows to zero after the softmax or None)."""
    if is_causal:
        if ke <= r0 + 1:  # every row of the block sees every column up to ke
            return None, None
        rows = torch.arange(r0, r1, device=like.device).unsqueeze(-1)  # (b, 1)
        cols = torch.arange(ke, device=like.device)  # (ke,)
        return torch.zeros(r1 - r0, ke, dtype=like.dtype, device=like.device).masked_fill_(
            cols > rows, float("-inf")
        ), None
    if attn_mask is None:
        return None, None
    m = attn_mask[..., :ke] if attn_mask.shape[-2] == 1 else attn_mask[..., r0:r1, :ke]
    if m.dtype == torch.bool:
        bias = torch.zeros(m.shape, dtype=like.dtype, device=like.device).masked_fill_(~m, float("-inf"))
        return bias, ~m.any(-1, keepdim=True)
    return m.to(like.dtype), torch.isneginf(m).all(-1, keepdim=True)


def _block_probs(qs, k, bias, dead) -> torch.Tensor:
    """softmax(qs k^T + bias) of one block, (B, H, b, ke); ``qs`` already scaled; fully masked rows give zeros."""
    s = torch.matmul(qs, k.transpose(-2, -1))  # (B, H, b, ke)
    if bias is not None:
        s.add_(bias)
    p = torch.softmax(s, dim=-1)
    if dead is not None:
        p.masked_fill_(dead, 0.0)
    return p


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1, keepdim=True)  # (..., b, 1)


def _up(*tensors):
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [None if t is None else t.to(dtype) for t in tensors]


def _blocked_grads(q, k, v, do, attn_mask, is_causal: bool, scale: float):
    """(dQ, dK, dV) of softmax attention for upstream dO, block by block of query rows (no autograd graph)."""
    qf, kf, vf, dof = _up(q, k, v, do)
    qs = qf * scale
    dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
    for r0, r1, ke in _blocks(attn_mask, is_causal, qf.shape[-2], kf.shape[-2]):
        if ke == 0:
            continue
        k_, v_, do_i = kf[..., :ke, :], vf[..., :ke, :], dof[..., r0:r1, :]
        p = _block_probs(qs[..., r0:r1, :], k_, *_block_mask(attn_mask, is_causal, r0, r1, ke, qf))
        dv[..., :ke, :].add_(torch.matmul(p.transpose(-2, -1), do_i))
        dp = torch.matmul(do_i, v_.transpose(-2, -1))  # (B, H, b, ke)
        ds = dp.sub_(_rowdot(p, dp)).mul_(p)  # dS
        dq[..., r0:r1, :] = torch.matmul(ds, k_)
        dk[..., :ke, :].add_(torch.matmul(ds.transpose(-2, -1), qf[..., r0:r1, :]))
    return dq.mul_(scale).to(q.dtype), dk.mul_(scale).to(k.dtype), dv.to(v.dtype)


# -- the explicit passes ---------------------------------------------------------------------------------------------
class _AttentionBackward(torch.autograd.Function):
    """(Q, K, V, dO) -> (dQ, dK, dV) of softmax attention, with the explicit backward in the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, do, attn_mask, is_causal, scale, out=None, lse=None):
        ctx.save_for_backward(
            q, k, v, do, attn_mask, out
        )  # the caller's mask: one tensor shared by every layer
        ctx.scale, ctx.is_causal = scale, is_causal
        if lse is not None:  # the CPU kernel's forward ran: its own backward computes the same (dQ, dK, dV)
            return _kernel_grads(do, q, k, v, out, lse, attn_mask, is_causal, scale)
        return _blocked_grads(q, k, v, do, attn_mask, is_causal, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, gq, gk, gv):
        q, k, v, do, attn_mask, out = ctx.saved_tensors
        scale, is_causal = ctx.scale, ctx.is_causal
        qf, kf, vf, dof = _up(q, k, v, do)
        gq, gk, gv = (
            torch.zeros_like(t) if g is None else g.to(t.dtype) for g, t in ((gq, qf), (gk, kf), (gv, vf))
        )
        qs = qf * scale
        # G = scale (gQ K^T + Q gK^T) as one product per block: [gQ, Q] (L, 2E) times [K, gK]^T (2E, S)
        qcat, kcat = torch.cat([gq * scale, qs], dim=-1), torch.cat([kf, gk], dim=-1)
        # D = rowsum(P * dP) = rowsum(dO * O): from the forward's output when it is at hand (L x E, not L x S)
        d_rows = None if out is None else _rowdot(dof, out.to(dof.dtype))  # (B, H, L, 1)
        grad_q, grad_k = torch.zeros_like(qf), torch.zeros_like(kf)
        grad_v, grad_do = torch.zeros_like(vf), torch.zeros_like(dof)
        for r0, r1, ke in _blocks(attn_mask, is_causal, qf.shape[-2], kf.shape[-2]):
            if ke == 0:
                continue
            k_, v_, gk_, gv_ = kf[..., :ke, :], vf[..., :ke, :], gk[..., :ke, :], gv[..., :ke, :]
            q_i, gq_i, do_i = qf[..., r0:r1, :], gq[..., r0:r1, :], dof[..., r0:r1, :]
            p = _block_probs(qs[..., r0:r1, :], k_, *_block_mask(attn_mask, is_causal, r0, r1, ke, qf))
            dp = torch.matmul(do_i, v_.transpose(-2, -1))  # (B, H, b, ke)
            dpd = dp - (_rowdot(p, dp) if d_rows is None else d_rows[..., r0:r1, :])  # dP - D
            ds = p * dpd  # dS
            g = torch.matmul(qcat[..., r0:r1, :], kcat[..., :ke, :].transpose(-2, -1))  # G
            c = _rowdot(g, p)  # (B, H, b, 1)
            gp = torch.matmul(do_i, gv_.transpose(-2, -1)).add_(dpd.mul_(g)).sub_(dp.mul_(c))  # gP
            gdp = g.sub_(c).mul_(p)  # (B, H, b, ke)
            gs = gp.sub_(_rowdot(p, gp)).mul_(p)  # gS
            grad_q[..., r0:r1, :] = torch.matmul(ds, gk_).add_(torch.matmul(gs, k_))
            grad_k[..., :ke, :].add_(torch.matmul(ds.transpose(-2, -1), gq_i))
            grad_k[..., :ke, :].add_(torch.matmul(gs.transpose(-2, -1), q_i))
            grad_v[..., :ke, :].add_(torch.matmul(gdp.transpose(-2, -1), do_i))
            grad_do[..., r0:r1, :] = torch.matmul(p, gv_).add_(torch.matmul(gdp, v_))
        return (
            grad_q.mul_(scale).to(q.dtype),
            grad_k.mul_(scale).to(k.dtype),
            grad_v.to(v.dtype),
            grad_do.to(do.dtype),
            *(None,)
            * 5,  # mask, is_causal, scale, out, lse: the formulas above already cover their dependence
        )


# -- the attention -------------------------------------------------------------------------------------------------
def _cpu_flash(q, k, v, attn_mask, is_causal: bool) -> bool:
    """Whether SDPA would run these inputs on its fused CPU kernel, which this module then calls directly."""
    if q.device.type != "cpu" or torch.is_autocast_enabled("cpu") or not (q.dtype == k.dtype == v.dtype):
        return False
    from torch.nn.attention import SDPBackend

    choice = torch._fused_sdp_choice(q, k, v, attn_mask, 0.0, is_causal)
    return choice == int(SDPBackend.FLASH_ATTENTION)


def _kernel_mask(attn_mask, like: torch.Tensor):
    """The CPU flash kernel takes a float mask of the query's dtype (SDPA converts bool masks the same way)."""
    if attn_mask is None or attn_mask.dtype == like.dtype:
        return attn_mask
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=like.dtype, device=like.device).masked_fill_(
            ~attn_mask, float("-inf")
        )
    return attn_mask.to(like.dtype)


def _kernel_grads(do, q, k, v, out, lse, attn_mask, is_causal: bool, scale: float):
    """(dQ, dK, dV) from the fused CPU kernel's backward, given its forward's output and log-sum-exp."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do.contiguous(), q, k, v, out, lse, 0.0, is_causal, attn_mask=_kernel_mask(attn_mask, q), scale=scale
    )


class _Attention(torch.autograd.Function):
    """softmax(scale Q K^T + M) V by the fused SDPA kernel; a differentiable backward through
    :class:`_AttentionBackward` under ``create_graph``, the fused kernel's backward otherwise."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale):
        ctx.scale, ctx.is_causal = scale, is_causal
        ctx.fused = _cpu_flash(q, k, v, attn_mask, is_causal)
        if ctx.fused:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, is_causal, attn_mask=_kernel_mask(attn_mask, q), scale=scale
            )  # (B, H, L, E), (B, H, L)
            ctx.save_for_backward(q, k, v, attn_mask, out, lse)
            return out
        out = _SDPA(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale
        )  # fused kernel, no L x S kept
        ctx.save_for_backward(q, k, v, attn_mask, out)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, attn_mask, *rest = ctx.saved_tensors
        scale, is_causal = ctx.scale, ctx.is_causal
        if torch.is_grad_enabled():  # the penalty's gradient, differentiated again later
            # out and lse enter as constants (detached): the explicit formulas already cover their dependence
            rest = [t.detach() for t in rest]
            dq, dk, dv = _AttentionBackward.apply(q, k, v, do, attn_mask, is_causal, scale, *rest)
        elif ctx.fused:  # the outer backward: first derivatives only, the fused kernel's own backward
            out, lse = rest
            dq, dk, dv = _kernel_grads(do, q, k, v, out, lse, attn_mask, is_causal, scale)
        else:  # the blocked passes (mixed dtypes under autocast, other devices)
            dq, dk, dv = _blocked_grads(q, k, v, do, attn_mask, is_causal, scale)
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
