"""Explicit Fisher penalties (token-F, logit-F): the curvature term that NEFTune's noise approximates.

Source: Shigeto and Shimbo, an analysis of noise injection in instruction tuning with explicit regularizers
(token-F / logit-F); NEFTune is https://arxiv.org/abs/2310.05914.

Why. With iid noise eps ~ U(-a, a) on the input embeddings X of a sequence, a second-order expansion gives

    E[loss(X + eps)] ~ loss(X) + a^2 / 6 * Tr(H_X),          H_X = d^2 loss / dX^2,

so noise injection is, to second order, a penalty on the trace of the loss Hessian w.r.t. the embeddings. The
Fisher information is the usual positive semi-definite surrogate: for the per-position loss -log p_t(y) with
y ~ p_t (the model's own predictive distribution), E_y[H_X] = F_X = E_y[g g^T] with g = grad_X log p_t(y).

The estimators. Let P be the set of predicted positions (a label != -100, real token, same packed document as
the next token), z_t the logits at t, p_t = softmax(z_t), and y'_t ~ p_t drawn independently per position:

    token-F:  R = 1/m sum_{s=1..m} || grad_X sum_{t in P} log p_t(y'_{s,t}) ||^2 / |P|
    logit-F:  R = 1/m sum_{s=1..m} || grad_X sum_{t in P} z_t . (e_{y'_{s,t}} - sg(p_t)) ||^2 / |P|

(sg = stop-gradient). One backward pass covers all positions: the square of the summed gradient has cross terms
<g_t, g_u> (t != u) whose expectation is 0, because E_{y ~ p_t}[grad_X log p_t(y)] = grad_X sum_y p_t(y) = 0 and
the y'_t are independent. So R is an unbiased estimate of (1 / |P|) sum_t Tr(F_{X,t}), the trace of the Fisher
of the *mean* cross-entropy, i.e. of E_{y'}[Tr(H_X)] for the loss the trainer minimizes. Per sample, logit-F's
value equals token-F's (grad_X log p_t(y) = J_t^T (e_y - p_t)); their gradients w.r.t. the parameters differ:
logit-F treats p as a constant, which skips the second derivative of the softmax and is cheaper.

``sampling="uniform"`` (the study's ablation) draws y' uniformly instead. Then E[g_t] != 0 and the cross terms
no longer vanish, so each position's term is multiplied by an independent random sign (Rademacher), which makes
the one-backward estimate unbiased again, now for (1/|P|) sum_t mean_y ||grad_X log p_t(y)||^2: a "uniform
Fisher", not Tr(F). The signs change nothing else.

Normalization: sum over embedding positions and embedding dimensions, mean over predicted positions, like the
mean cross-entropy; the trainer divides by the same token count it divides the loss by (``num_items_in_batch``
under gradient accumulation). A coefficient ``c_sum`` tuned for a *sum*-normalized penalty (sum over predicted
positions) next to a mean cross-entropy converts as ``coef = c_sum * |P|`` (|P| = predicted tokens per optimizer
step); if that setup also summed the loss, the objective is ours times |P| and the coefficient carries over as is.

Attention kernels. The penalty differentiates a gradient, so the forward pass needs a double-backward graph.
Fused SDPA kernels (flash / memory-efficient, and the CPU flash kernel) have none, and SDPA's math backend keeps
several L x L tensors per layer in the second-order graph; :func:`differentiable_attention` routes SDPA calls of
that forward pass to ``noisyft.methods.fisher.attention`` (the fused kernel forward, an explicit double backward
that recomputes the probabilities; ``sdpa="math"`` keeps the math backend as the reference) and refuses kernels it
cannot switch (flash_attention_2/3, flex attention), reentrant gradient checkpointing and FSDP2-sharded models
(``fully_shard`` frees gathered weights after the first of the two backward passes) with a clear error.

The LM head. The logits path keeps about five (N, V) float32 tensors from the forward to the outer backward (the
log-softmax, the scattered score gradient, its log-softmax backward, ...): 1 GB at 1024 tokens and a 49k vocabulary,
the largest part of the penalty's extra memory. :func:`fisher_penalty_from_hidden` (what :func:`fisher_penalty` and
the trainer use) instead runs a plain ``nn.Linear`` head through ``noisyft.methods.fisher.head.FusedHead``:
cross-entropy, draws and the score gradient w.r.t. the hidden states chunk by chunk of rows, the logits recomputed
in the backward. Same values and gradients (tested against the logits path), one more head-sized product, no (N, V)
tensor kept. The attention routing lives in ``noisyft.methods.fisher.routing``.

This module is pure torch + a few transformers model conventions (``get_input_embeddings``, ``base_model``,
``get_output_embeddings``); the Trainer wiring lives in ``noisyft.methods.fisher.plugin``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from noisyft._torch import logit_stats, unwrap_model

from .config import KINDS, SAMPLINGS
from .head import FusedHead, plain_head
from .routing import FisherSetupError as FisherSetupError  # re-exported: the trainer catches it
from .routing import differentiable_attention

REDUCTIONS = ("mean", "sum", "none")
IGNORE_INDEX = -100


# -- model pieces ---------------------------------------------------------------------------------------------------
def _backbone(base: torch.nn.Module) -> torch.nn.Module:
    backbone = getattr(base, "base_model", None)
    if backbone is None or backbone is base:
        raise TypeError(
            f"{type(base).__name__} exposes no decoder backbone (`base_model`); the Fisher penalty needs a "
            "transformers causal LM (…ForCausalLM)"
        )
    return backbone


def logits_from_hidden(base: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for final hidden states ``hidden`` (N, D) -> (N, V), in float32 at least.

    Applies the LM head and the two logit transforms causal LMs in transformers use on top of it: a
    ``logit_scale`` multiplier (Cohere) and ``final_logit_softcapping`` (Gemma 2/3): cap * tanh(z / cap).
    """
    head = base.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(base).__name__} has no output embeddings (LM head)")
    z = head(hidden)  # (N, V)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    scale = getattr(text_config, "logit_scale", None)
    if scale is not None and scale != 1:
        z = z * scale
    cap = getattr(text_config, "final_logit_softcapping", None)
    if cap:
        z = cap * torch.tanh(z / cap)
    return z


def predicted_positions(
    shape: tuple[int, int],
    *,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Boolean (B, T) mask of the positions t whose logits predict token t + 1 in the loss.

    HF convention: ``labels`` are unshifted, -100 = ignored, so t is predicted when ``labels[:, t + 1] != -100``.
    Both t and t + 1 must be real tokens (``attention_mask``), and t + 1 must not start a new packed document
    (``position_ids[:, t + 1] == 0``). Without labels every such real position counts. The last column never does.
    """
    B, T = shape
    pred = torch.zeros(B, T, dtype=torch.bool, device=device)
    nxt = torch.ones(B, T - 1, dtype=torch.bool, device=device)  # (B, T-1), about token t + 1
    if labels is not None:
        nxt &= labels[:, 1:].to(device) != IGNORE_INDEX
    if attention_mask is not None:
        real = attention_mask.to(device=device, dtype=torch.bool).expand(B, T)
        nxt &= real[:, 1:] & real[:, :-1]
    if position_ids is not None:
        nxt &= position_ids.to(device).expand(B, T)[:, 1:] != 0
    pred[:, :-1] = nxt
    return pred


# -- the estimator ---------------------------------------------------------------------------------------------------
def _draw_labels(
    log_probs: torch.Tensor, num_samples: int, sampling: str, generator: torch.Generator | None
) -> torch.Tensor:
    """y' of shape (N, m): from p = exp(log_probs) (inverse CDF: one cumsum and a binary search per draw, several
    times cheaper than ``torch.multinomial`` over a 50k vocabulary on CPU) or uniform over the vocabulary."""
    N, V = log_probs.shape
    if sampling == "uniform":
        return torch.randint(V, (N, num_samples), device=log_probs.device, generator=generator)
    cdf = log_probs.detach().float().exp().cumsum(dim=-1)  # (N, V), cdf[:, -1] ~ 1
    u = torch.rand(N, num_samples, device=cdf.device, generator=generator) * cdf[:, -1:]  # (N, m)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=V - 1)  # (N, m)


def next_token_targets(
    input_ids: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """The tokens the predicted positions predict, (N,) in :func:`predicted_positions` order: token t + 1 of the
    labels (or of ``input_ids`` when there are none) for every predicted position t."""
    source = labels if labels is not None else input_ids
    shifted = torch.cat([source[:, 1:], source[:, :1]], dim=1).to(
        predicted.device
    )  # (B, T): token t + 1 at t
    return shifted[predicted]  # (N,)


def _check_args(kind: str, sampling: str, reduction: str, num_samples: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")


def fisher_penalty_from_logits(
    embeds: torch.Tensor,
    logits: torch.Tensor,
    *,
    token_mask: torch.Tensor | None = None,
    kind: str = "token",
    num_samples: int = 1,
    sampling: str = "model",
    generator: torch.Generator | None = None,
    normalizer: float | torch.Tensor | None = None,
    reduction: str = "mean",
    create_graph: bool = True,
    targets: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The penalty from a forward pass that already ran: ``embeds`` (B, T, D) -> ... -> ``logits`` (N, V).

    Args:
        embeds: the input embeddings X, part of the graph that produced ``logits`` (``requires_grad``).
        logits: float logits of the N predicted positions only (e.g. ``logits_from_hidden(base, hidden[pred])``);
            the same tensor can feed the cross-entropy, so the LM head runs once for both.
        token_mask: (B, T) real tokens; gradients on other positions are not counted (they are 0 for a correctly
            masked model anyway).
        normalizer: the |P| to divide by; defaults to N (pass the trainer's token count under gradient
            accumulation).
        reduction: ``"mean"`` (sum / normalizer / m: the penalty), ``"sum"`` (without / normalizer), ``"none"``:
            a (B,) tensor of each sequence's share of the ``"mean"`` value (they sum to it).
        create_graph: keep the graph of the gradient so the penalty back-propagates into the parameters; ``False``
            for a diagnostic value.
        targets: (N,) next tokens; when given, also returns the summed cross-entropy of ``logits`` against them,
            from the same log-softmax as the penalty: ``(penalty, nll_sum)``.
    """
    _check_args(kind, sampling, reduction, num_samples)
    if not embeds.requires_grad:
        raise ValueError(
            "embeds must require grad (they are what the penalty differentiates with respect to)"
        )
    B = embeds.shape[0]
    N = logits.shape[0]
    if normalizer is None:
        normalizer = max(N, 1)
    if N == 0:  # nothing to penalize: a differentiable zero, still connected to the graph
        zero = embeds.sum() * 0.0
        penalty = zero.expand(B).clone() if reduction == "none" else zero
        return penalty if targets is None else (penalty, logits.sum() * 0.0)

    z = logits  # (N, V)
    logp = torch.log_softmax(z, dim=-1)  # (N, V), shared by the sampler, token-F and the cross-entropy
    y = _draw_labels(logp, num_samples, sampling, generator)  # (N, m)
    if kind == "token":
        scores = logp.gather(1, y)  # (N, m): log p_t(y'_s)
    else:  # z_t . (e_y' - sg(p_t))
        scores = z.gather(1, y) - (z * logp.detach().exp()).sum(-1, keepdim=True)  # (N, m)
    if sampling == "uniform":  # random signs cancel the cross terms, whose mean is not 0 under uniform y'
        signs = torch.randint(2, scores.shape, device=z.device, generator=generator) * 2 - 1
        scores = scores * signs

    grads = [
        torch.autograd.grad(scores[:, s].sum(), embeds, create_graph=create_graph, retain_graph=True)[0]
        for s in range(num_samples)
    ]  # each (B, T, D)
    penalty = _reduce(grads, embeds, token_mask, normalizer, reduction)
    if targets is None:
        return penalty
    return penalty, -logp.gather(1, targets.to(logp.device).unsqueeze(1)).sum()


# -- the penalty through the chunked LM head ------------------------------------------------------------------------
def fisher_penalty_from_hidden(
    base: torch.nn.Module,
    embeds: torch.Tensor,
    hidden: torch.Tensor,
    *,
    token_mask: torch.Tensor | None = None,
    kind: str = "token",
    num_samples: int = 1,
    sampling: str = "model",
    generator: torch.Generator | None = None,
    normalizer: float | torch.Tensor | None = None,
    reduction: str = "mean",
    create_graph: bool = True,
    targets: torch.Tensor | None = None,
    fused_head: bool = True,
    stats: bool = False,
):
    """:func:`fisher_penalty_from_logits` from the final hidden states of the N predicted positions (N, D), with
    the LM head applied here: chunk by chunk through :class:`~noisyft.methods.fisher.head.FusedHead` where
    :func:`~noisyft.methods.fisher.head.plain_head` allows (and autocast is off), through the logits otherwise (or
    with ``fused_head=False``); same values, same gradients.

    Returns ``penalty`` or, with ``targets``, ``(penalty, nll_sum, stats)``; ``stats`` (only with ``stats=True``,
    else None) = (entropy sum, correct argmax count) over the N positions, TRL's logged metrics, as 0-d tensors.
    """
    _check_args(kind, sampling, reduction, num_samples)
    head = plain_head(base) if fused_head else None
    if head is None or hidden.shape[0] == 0 or torch.is_autocast_enabled(hidden.device.type):
        logits = logits_from_hidden(base, hidden)  # (N, V)
        result = fisher_penalty_from_logits(
            embeds, logits, token_mask=token_mask, kind=kind, num_samples=num_samples, sampling=sampling,
            generator=generator, normalizer=normalizer, reduction=reduction, create_graph=create_graph,
            targets=targets,
        )  # fmt: skip
        if targets is None:
            return result
        return (*result, logit_stats(logits, targets) if stats else None)
    if not embeds.requires_grad:
        raise ValueError(
            "embeds must require grad (they are what the penalty differentiates with respect to)"
        )
    weight, bias = head
    nll, dh, ent, correct = FusedHead.apply(
        hidden, weight, bias, None if targets is None else targets.to(hidden.device), kind, num_samples, sampling,
        generator, stats,
    )  # fmt: skip
    grads = [
        torch.autograd.grad(hidden, embeds, dh[s], create_graph=create_graph, retain_graph=True)[0]
        for s in range(num_samples)
    ]  # each (B, T, D)
    penalty = _reduce(grads, embeds, token_mask, normalizer or max(hidden.shape[0], 1), reduction)
    return penalty if targets is None else (penalty, nll, (ent, correct) if stats else None)


def _reduce(grads, embeds, token_mask, normalizer, reduction) -> torch.Tensor:
    """sum_s ||grad_s||^2 over masked positions and dimensions, per sequence, then reduced like the loss."""
    mask = (
        None if token_mask is None else token_mask.to(embeds.device, embeds.dtype).unsqueeze(-1)
    )  # (B, T, 1)
    acc_dtype = torch.promote_types(embeds.dtype, torch.float32)
    total = embeds.new_zeros(embeds.shape[0], dtype=acc_dtype)  # (B,)
    for grad in grads:
        if mask is not None:
            grad = grad * mask
        total = total + grad.to(acc_dtype).pow(2).sum(dim=(1, 2))  # (B,)
    total = total / len(grads)
    if reduction == "sum":
        return total.sum()
    total = total / normalizer
    return total if reduction == "none" else total.sum()


class _Capture:
    """Forward hooks that keep the input embeddings (made to require grad) and the backbone's last hidden state."""

    def __init__(self, base: torch.nn.Module):
        self.embeds: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None
        self._handles = [
            base.get_input_embeddings().register_forward_hook(self._on_embeds),
            _backbone(base).register_forward_hook(self._on_backbone),
        ]

    def _on_embeds(self, module, args, output):
        if not torch.is_grad_enabled() or self.embeds is not None:
            return None
        if not output.requires_grad:  # frozen embeddings (LoRA): a leaf to differentiate with respect to
            output = output.detach().requires_grad_()
        self.embeds = output
        return output

    def _on_backbone(self, module, args, output):
        if not torch.is_grad_enabled() or self.hidden is not None:
            return
        self.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextlib.contextmanager
def capture_forward(model: torch.nn.Module, *, sdpa: str = "fused") -> Iterator[_Capture]:
    """Within the body, the first grad-enabled forward of ``model`` leaves its embeddings and final hidden state
    in the yielded object, over an attention path with a double backward (:func:`differentiable_attention`)."""
    base = unwrap_model(model)
    capture = _Capture(base)
    try:
        with differentiable_attention(base, sdpa=sdpa):
            yield capture
    finally:
        capture.remove()


def fisher_penalty(
    model: torch.nn.Module,
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    kind: str = "token",
    num_samples: int = 1,
    sampling: str = "model",
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    create_graph: bool = True,
    return_loss: bool = False,
    sdpa: str = "fused",
    fused_head: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """token-F / logit-F penalty of a causal LM on a batch: a scalar that back-propagates into the parameters.

    Runs the model's backbone on its own embeddings of ``input_ids`` (B, T), on an attention path with a double
    backward, and returns ``1/m sum_s ||grad_X sum_{t in P} score_t(y'_{s,t})||^2 / |P|`` (module docstring):
    an unbiased estimate of the Fisher trace of the mean cross-entropy w.r.t. the input embeddings. ``labels``
    follow the HF causal-LM convention (unshifted, -100 ignored) and choose the predicted positions P; padding
    (``attention_mask``) is excluded, and packed rows (``position_ids`` restarting at 0) are handled. The model's
    train/eval mode is left as it is (dropout applies in train mode). See :func:`fisher_penalty_from_logits` for
    ``reduction`` and ``create_graph``. ``return_loss=True`` also returns the mean cross-entropy over the same
    predicted positions, computed from the same logits (one forward pass, one LM-head product for both):
    ``(penalty, loss)``. ``sdpa``: see :func:`differentiable_attention`; ``fused_head``: see
    :func:`fisher_penalty_from_hidden`.
    """
    base = unwrap_model(model)
    with capture_forward(model, sdpa=sdpa) as cap:
        embeds = base.get_input_embeddings()(input_ids)  # (B, T, D)
        if not embeds.requires_grad:
            embeds = embeds.detach().requires_grad_()
        kwargs: dict[str, Any] = {"inputs_embeds": embeds, "use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        _backbone(base)(**kwargs)
    if cap.hidden is None:
        raise RuntimeError("the backbone forward returned no hidden state")
    predicted = predicted_positions(
        tuple(input_ids.shape),
        labels=labels,
        attention_mask=attention_mask,
        position_ids=position_ids,
        device=embeds.device,
    )
    hidden = cap.hidden[predicted]  # (N, D)
    result = fisher_penalty_from_hidden(
        base,
        embeds,
        hidden,
        token_mask=attention_mask,
        kind=kind,
        num_samples=num_samples,
        sampling=sampling,
        generator=generator,
        reduction=reduction,
        create_graph=create_graph,
        targets=next_token_targets(input_ids, predicted, labels) if return_loss else None,
        fused_head=fused_head,
    )
    if not return_loss:
        return result
    penalty, nll_sum, _ = result
    return penalty, nll_sum / max(hidden.shape[0], 1)
