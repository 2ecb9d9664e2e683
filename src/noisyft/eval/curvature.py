"""Curvature check: does NEFTune's noise act as a penalty on the Hessian trace w.r.t. the input embeddings?

Claim (second-order expansion, Fisher-penalty study; NEFTune is https://arxiv.org/abs/2310.05914). Let X be the
input embeddings of a batch (output of ``model.get_input_embeddings()``), L_s the real length of sequence s, d the
embedding width, loss(X) the mean cross-entropy over the batch's predicted positions (HF convention: unshifted
labels, -100 ignored), H = d^2 loss / dX^2 and H_{X_s} its diagonal block for sequence s. NEFTune noise
(``scale="sequence"``) is eps_{s,t} = a_s * U(-1, 1)^d with a_s = alpha / sqrt(L_s d), zero on padding. Since
E[eps] = 0 and E[eps eps^T] = diag(a_s^2 / 3),

    gap(alpha) := E[loss(X + eps)] - loss(X) = 1/2 E[eps^T H eps] + O(alpha^4) = sum_s a_s^2 / 6 * Tr(H_{X_s}) + O(alpha^4)

(odd orders vanish because the noise is symmetric). Three estimates, all with standard errors:

* ``mc_gap``: Monte-Carlo gap with antithetic pairs, mean over draws of (loss(X + eps) + loss(X - eps)) / 2 - loss(X).
  Unbiased for gap(alpha) because eps and -eps have the same law; the pair cancels the first-order term
  grad . eps, whose variance otherwise swamps the O(alpha^2) signal by orders of magnitude. The same unit draws are
  used for every alpha (common random numbers), so the rows differ only through alpha.
* ``second_order`` = sum_s a_s^2 / 6 * Tr(H_{X_s}) by Hutchinson's estimator: E[v^T H v] = Tr(H) for Rademacher v;
  with v_s = a_s * Rademacher it estimates sum_s a_s^2 Tr(H_{X_s}) directly. H v is a double backward
  (grad of grad(loss) . v w.r.t. X), over an attention path that has one
  (:func:`noisyft.methods.fisher.penalty.differentiable_attention`).
* ``fisher`` = sum_s a_s^2 / 6 * Tr(F_{X_s}), Tr(F) from the token-F estimator
  (:func:`noisyft.methods.fisher.penalty.fisher_penalty`, labels y' drawn from the model): the positive
  semi-definite surrogate the Fisher penalty trains with. E_{y' ~ p}[H] = F, but at the data's labels H and F differ.

Precision: the gap is a difference of nearly equal losses (about 1e-4 of the loss at alpha = 1 on SmolLM2), so
:func:`curvature_report` works on a float64 copy of the model by default; float32 rounding (about 1e-7 relative
per loss) limits a float32 run to gaps well above 1e-6. Note that transformers' RMSNorm (Llama, SmolLM2) computes
in float32 even in a float64 model, so "float64" is float64 everywhere but in the norms. The base loss is computed
with the same batch shapes as the noised ones, so shape-dependent rounding cancels in the difference. Everything
runs in eval mode (no dropout) and leaves the model's mode as it was. Packed rows (``position_ids``) are not
supported.

Variance: per draw, the uniform noise's quadratic form has a larger variance than a Rademacher probe's (the
diagonal adds (9/5 - 1) sigma^4 sum_i H_ii^2, sigma^2 = a^2 / 3), and when Tr(H) is a small difference of large
diagonal terms of both signs (it is at the data's labels), ``mc_samples`` needs to be several times
``hutchinson_samples`` for the same relative error.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from noisyft._torch import unwrap_model
from noisyft.methods.neftune.noise import neftune_noise, token_sequence_lengths

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
DEFAULT_ALPHAS = (1.0, 5.0, 15.0)


# -- batches ----------------------------------------------------------------------------------------------------------
def batch_from_dataset(dataset: Any, n: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """The first ``n`` examples of a tokenized SFT dataset (``input_ids``, ``assistant_masks``) as a right-padded
    batch: ``input_ids`` (B, T), ``attention_mask`` (B, T) and ``labels`` (B, T), unshifted, -100 outside the
    responses and on padding."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if len(dataset) < n:
        raise ValueError(f"the dataset has {len(dataset)} examples, fewer than the {n} asked for")
    rows = [dataset[i] for i in range(n)]
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros(n, width, dtype=torch.long)  # (B, T)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        ids = torch.as_tensor(r["input_ids"], dtype=torch.long)
        mask = torch.as_tensor(r["assistant_masks"], dtype=torch.bool)
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.where(mask, ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _checked(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    if "position_ids" in batch and batch["position_ids"] is not None:
        raise ValueError("packed batches (position_ids) are not supported by the curvature analysis")
    input_ids = batch["input_ids"].to(device)  # (B, T)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    attention_mask = batch.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    labels = batch.get("labels")
    if labels is None:
        labels = torch.where(attention_mask.bool(), input_ids, IGNORE_INDEX)
    labels = torch.where(attention_mask.bool(), labels.to(device), IGNORE_INDEX)  # (B, T)
    if not (labels[:, 1:] != IGNORE_INDEX).any():
        raise ValueError("the batch has no predicted position (every label after the first is -100)")
    return input_ids, attention_mask, labels


def noise_scales(attention_mask: torch.Tensor, dim: int, alpha: float = 1.0) -> torch.Tensor:
    """a_{s,t} = alpha / sqrt(L_s * d) per token (B, T), 0 on padding: NEFTune's ``scale="sequence"`` factor."""
    lengths = token_sequence_lengths(
        tuple(attention_mask.shape), attention_mask=attention_mask
    ).double()  # (B, T)
    return torch.where(lengths > 0, alpha * torch.rsqrt(lengths.clamp_min(1.0) * dim), 0.0)  # (B, T) float64


def _unit_noise(
    X: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """NEFTune noise at alpha = 1: U(-1, 1) / sqrt(L_s d) on real tokens, 0 on padding; X (B, T, d) -> (B, T, d)."""
    return neftune_noise(X, alpha=1.0, attention_mask=attention_mask, scale="sequence", generator=generator)


# -- the loss as a function of the embeddings --------------------------------------------------------------------
def _replica_losses(
    model: torch.nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of each of K replicas of the batch: embeds (K, B, T, d) -> (K,).

    The K replicas run as one (K*B)-row forward pass; a replica's loss is its NLL summed over predicted positions
    divided by the batch's predicted-position count P (the HF mean over the batch)."""
    K, B, T, d = embeds.shape
    mask = attention_mask.repeat(K, 1)  # (K*B, T)
    logits = model(inputs_embeds=embeds.reshape(K * B, T, d), attention_mask=mask, use_cache=False).logits
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # (K*B, T-1, V)
    targets = labels[:, 1:].repeat(K, 1)  # (K*B, T-1)
    nll = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (K*B, T-1), 0 where ignored
    n_predicted = (labels[:, 1:] != IGNORE_INDEX).sum()
    return nll.reshape(K, B * (T - 1)).sum(dim=1) / n_predicted  # (K,)


def _chunks(total: int, per_chunk: int) -> list[int]:
    return [min(per_chunk, total - i) for i in range(0, total, per_chunk)]


class _EvalMode:
    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def _mean_se(samples: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)) of a 1-D tensor of iid draws."""
    samples = samples.double()
    n = samples.numel()
    se = float(samples.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(samples.mean()), se


# -- Monte-Carlo gap -------------------------------------------------------------------------------------------------
def mc_noise_gap(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    alphas: Sequence[float],
    *,
    num_samples: int,
    generator: torch.Generator | None,
    max_batch_rows: int = 16,
) -> list[dict[str, float]]:
    """Monte-Carlo estimate of E[loss(X + eps)] - loss(X) under NEFTune noise, one dict per alpha.

    Each draw u = U(-1, 1) / sqrt(L_s d) (0 on padding, :func:`~noisyft.methods.neftune.noise.neftune_noise` with
    ``scale="sequence"``) gives, for every alpha, the antithetic sample (loss(X + alpha u) + loss(X - alpha u)) / 2
    - loss(X): unbiased (u and -u are equally likely), free of the first-order term. Returns ``alpha``, ``mc_gap``
    (mean), ``se`` (standard error over the ``num_samples`` draws), ``num_samples`` and ``base_loss`` = loss(X).
    The loss is computed in the model's dtype (float32 at least for the softmax); see the module docstring on
    precision. Draws run ``max_batch_rows // B`` at a time as replicas of the batch in one forward pass.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (a standard error needs two draws), got {num_samples}")
    if not alphas or any(a < 0 for a in alphas):
        raise ValueError(f"alphas must be a non-empty list of numbers >= 0, got {list(alphas)}")
    device = next(model.parameters()).device
    input_ids, attention_mask, labels = _checked(batch, device)
    B = input_ids.shape[0]
    per_forward = max(1, max_batch_rows // B)
    gaps = torch.zeros(num_samples, len(alphas), dtype=torch.float64)
    with _EvalMode(model), torch.no_grad():
        X = unwrap_model(model).get_input_embeddings()(input_ids)  # (B, T, d)
        bases: dict[int, torch.Tensor] = {}  # loss(X) as k replicas: the same shapes, so the same rounding
        done = 0
        for k in _chunks(num_samples, per_forward):
            if k not in bases:
                bases[k] = _replica_losses(model, X.expand(k, *X.shape), attention_mask, labels)  # (k,)
            base = bases[k]
            units = torch.stack([_unit_noise(X, attention_mask, generator) for _ in range(k)])  # (k, B, T, d)
            for j, alpha in enumerate(alphas):
                eps = alpha * units  # (k, B, T, d)
                plus = _replica_losses(model, X + eps, attention_mask, labels)  # (k,)
                minus = _replica_losses(model, X - eps, attention_mask, labels)  # (k,)
                gaps[done : done + k, j] = ((plus + minus) / 2 - base).double().cpu()
            done += k
    base_loss = float(next(iter(bases.values()))[0])
    rows = []
    for j, alpha in enumerate(alphas):
        mean, se = _mean_se(gaps[:, j])
        rows.append(
            {
                "alpha": float(alpha),
                "mc_gap": mean,
                "se": se,
                "num_samples": num_samples,
                "base_loss": base_loss,
            }
        )
    return rows


# -- Hutchinson ------------------------------------------------------------------------------------------------------
@dataclass
class TraceEstimate:
    """Mean ± standard error of a trace estimate, with per-sequence shares (they sum to ``mean``).

    ``samples`` (num_samples, B) holds every draw's per-sequence values; it is left out of :meth:`to_dict`."""

    mean: float
    se: float
    num_samples: int
    per_sequence: list[float]
    per_sequence_se: list[float]
    samples: torch.Tensor = field(repr=False)

    @classmethod
    def from_samples(cls, samples: torch.Tensor) -> TraceEstimate:
        samples = samples.double().cpu()  # (N, B)
        mean, se = _mean_se(samples.sum(dim=1))
        per = [_mean_se(samples[:, s]) for s in range(samples.shape[1])]
        return cls(mean, se, samples.shape[0], [m for m, _ in per], [s for _, s in per], samples)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "se": self.se,
            "num_samples": self.num_samples,
            "per_sequence": self.per_sequence,
            "per_sequence_se": self.per_sequence_se,
        }


def _hvp_samples(
    model: torch.nn.Module,
    X: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    probes: torch.Tensor,
) -> torch.Tensor:
    """v^T H v split per sequence for K probes (K, B, T, d) -> (K, B), in one double backward.

    The K probes act on K replicas of the batch; the summed replica losses have a block-diagonal Hessian, so one
    Hessian-vector product gives every replica's H v."""
    K = probes.shape[0]
    Xk = X.detach().unsqueeze(0).repeat(K, 1, 1, 1).requires_grad_()  # (K, B, T, d)
    losses = _replica_losses(model, Xk, attention_mask, labels)  # (K,)
    (grad,) = torch.autograd.grad(losses.sum(), Xk, create_graph=True)  # (K, B, T, d)
    (hv,) = torch.autograd.grad((grad * probes).sum(), Xk)  # (K, B, T, d)
    return (probes * hv).sum(dim=(2, 3))  # (K, B)


def hutchinson_trace(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    num_samples: int,
    generator: torch.Generator | None,
    scale: torch.Tensor | None = None,
    max_batch_rows: int = 16,
) -> TraceEstimate:
    """Hutchinson's estimate of Tr(H_X), H the Hessian of the mean cross-entropy w.r.t. the input embeddings X.

    Each sample is v^T H v with v = scale * r, r Rademacher (+-1, iid) on real tokens and 0 on padding; E[v^T H v]
    = sum_t scale_t^2 Tr(H_tt). Without ``scale`` that is Tr(H_X) (over real tokens; padding embeddings do not
    reach the loss). With ``scale`` (B,) per sequence or (B, T) per token, e.g. a_s = alpha / sqrt(L_s d)
    (:func:`noise_scales`), it is sum_s a_s^2 Tr(H_{X_s}), so ``second_order = estimate / 6``. The variance of a
    sample is 2 sum_{i != j} (scale_i scale_j H_ij)^2. H v is computed by double backward in eval mode, over an
    attention path with a double backward (:func:`~noisyft.methods.fisher.penalty.differentiable_attention`).
    Per-sequence shares are exact per draw because the Hessian is block-diagonal across sequences.
    """
    from noisyft.methods.fisher.penalty import differentiable_attention

    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (a standard error needs two draws), got {num_samples}")
    device = next(model.parameters()).device
    input_ids, attention_mask, labels = _checked(batch, device)
    B, T = input_ids.shape
    weight = attention_mask.to(torch.float64)  # (B, T)
    if scale is not None:
        scale = scale.to(device=device, dtype=torch.float64)
        if scale.shape == (B,):
            scale = scale[:, None]
        elif scale.shape != (B, T):
            raise ValueError(f"scale must have shape ({B},) or ({B}, {T}), got {tuple(scale.shape)}")
        weight = weight * scale  # (B, T)
    per_forward = max(1, max_batch_rows // B)
    out = []
    with _EvalMode(model), differentiable_attention(model), torch.enable_grad():
        X = unwrap_model(model).get_input_embeddings()(input_ids).detach()  # (B, T, d)
        for k in _chunks(num_samples, per_forward):
            signs = (
                torch.randint(0, 2, (k, *X.shape), generator=generator, device=device) * 2 - 1
            )  # (k, B, T, d)
            probes = signs.to(X.dtype) * weight.to(X.dtype)[None, :, :, None]  # (k, B, T, d)
            out.append(_hvp_samples(model, X, attention_mask, labels, probes).detach())
    return TraceEstimate.from_samples(torch.cat(out))


# -- Fisher ----------------------------------------------------------------------------------------------------------
def fisher_trace(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    num_samples: int,
    generator: torch.Generator | None,
) -> TraceEstimate:
    """token-F estimate of Tr(F_X) of the mean cross-entropy, one draw of y' ~ p per sample, per-sequence shares
    (:func:`~noisyft.methods.fisher.penalty.fisher_penalty` with ``reduction="none"``: ||g_s||^2 / P), eval mode."""
    from noisyft.methods.fisher.penalty import fisher_penalty

    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (a standard error needs two draws), got {num_samples}")
    device = next(model.parameters()).device
    input_ids, attention_mask, labels = _checked(batch, device)
    draws = []
    with _EvalMode(model), torch.enable_grad():
        for _ in range(num_samples):
            value = fisher_penalty(
                model,
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                kind="token",
                num_samples=1,
                sampling="model",
                generator=generator,
                reduction="none",
                create_graph=False,
            )  # (B,)
            draws.append(value.detach())
    return TraceEstimate.from_samples(torch.stack(draws))


# -- the report ------------------------------------------------------------------------------------------------------
def _as_dtype(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    if dtype == "model":
        return model
    target = {"float64": torch.float64, "float32": torch.float32}.get(dtype)
    if target is None:
        raise ValueError(f"dtype must be 'float64', 'float32' or 'model', got {dtype!r}")
    if all(p.dtype == target for p in model.parameters()):
        return model
    logger.info("curvature analysis on a %s copy of the model", dtype)
    return copy.deepcopy(model).to(target)


def curvature_report(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    mc_samples: int = 64,
    hutchinson_samples: int = 32,
    fisher_samples: int = 32,
    seed: int = 0,
    dtype: str = "float64",
    max_batch_rows: int = 16,
) -> dict[str, Any]:
    """The curvature table: per alpha, the Monte-Carlo gap beside a^2/6 Tr(H_X) and a^2/6 Tr(F_X).

    Rows: ``alpha``, ``mc_gap`` ± ``mc_gap_se``, ``second_order`` = sum_s a_s^2/6 Tr(H_{X_s}) ± se,
    ``fisher`` = sum_s a_s^2/6 Tr(F_{X_s}) ± se (None when ``fisher_samples`` is 0), ``ratio`` = mc_gap /
    second_order and ``z`` = (mc_gap - second_order) / sqrt(se_mc^2 + se_2^2): |z| of a few means agreement within
    sampling error. ``traces`` holds the raw traces: Tr(H_X), Tr(F_X) (mean ± se, per sequence) and the weighted
    sums sum_s Tr(H_{X_s}) / (L_s d) (alpha = 1). ``dtype``: ``"float64"`` (default; a float64 copy when the model
    is not already), ``"float32"`` or ``"model"``. Seeds: the MC noise, the Rademacher probes and the Fisher
    labels use independent generators seeded from ``seed``. JSON-serializable.
    """
    if fisher_samples != 0 and fisher_samples < 2:
        raise ValueError(f"fisher_samples must be 0 (skip) or >= 2, got {fisher_samples}")
    work = _as_dtype(model, dtype)
    device = next(work.parameters()).device
    input_ids, attention_mask, labels = _checked(batch, device)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    d = unwrap_model(work).get_input_embeddings().embedding_dim
    unit_scale = noise_scales(attention_mask, d)  # (B, T), 1 / sqrt(L_s d)
    a2 = unit_scale.amax(dim=1).double().cpu() ** 2  # (B,), a_s^2 at alpha = 1 (constant over a sequence)

    def gen(offset: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed + offset)

    mc = mc_noise_gap(
        work, batch, alphas, num_samples=mc_samples, generator=gen(0), max_batch_rows=max_batch_rows
    )
    weighted_h = hutchinson_trace(
        work,
        batch,
        num_samples=hutchinson_samples,
        generator=gen(1),
        scale=unit_scale,
        max_batch_rows=max_batch_rows,
    )  # estimates sum_s a_s^2 Tr(H_{X_s}) at alpha = 1
    hessian = TraceEstimate.from_samples(weighted_h.samples / a2)  # Tr(H_{X_s}) per sequence
    fisher = weighted_f = None
    if fisher_samples:
        fisher = fisher_trace(work, batch, num_samples=fisher_samples, generator=gen(2))
        weighted_f = TraceEstimate.from_samples(fisher.samples * a2)

    table = []
    for row in mc:
        alpha2 = row["alpha"] ** 2
        second, second_se = alpha2 * weighted_h.mean / 6, alpha2 * weighted_h.se / 6
        combined = math.hypot(row["se"], second_se)
        table.append(
            {
                "alpha": row["alpha"],
                "mc_gap": row["mc_gap"],
                "mc_gap_se": row["se"],
                "second_order": second,
                "second_order_se": second_se,
                "fisher": alpha2 * weighted_f.mean / 6 if weighted_f else None,
                "fisher_se": alpha2 * weighted_f.se / 6 if weighted_f else None,
                "ratio": row["mc_gap"] / second if second else None,
                "z": (row["mc_gap"] - second) / combined if combined > 0 else None,
            }
        )
    lengths = attention_mask.sum(dim=1).tolist()
    predicted = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
    return {
        "table": table,
        "base_loss": mc[0]["base_loss"],
        "traces": {
            "hessian": hessian.to_dict(),
            "hessian_weighted": weighted_h.to_dict(),
            "fisher": fisher.to_dict() if fisher else None,
            "fisher_weighted": weighted_f.to_dict() if weighted_f else None,
        },
        "batch": {
            "n_sequences": len(lengths),
            "lengths": lengths,
            "predicted_positions": predicted,
            "embedding_dim": d,
        },
        "settings": {
            "alphas": [float(a) for a in alphas],
            "mc_samples": mc_samples,
            "hutchinson_samples": hutchinson_samples,
            "fisher_samples": fisher_samples,
            "seed": seed,
            "dtype": str(next(work.parameters()).dtype).removeprefix("torch."),
            "noise": "uniform, eps = U(-1,1) * alpha / sqrt(L_s * d), 0 on padding (NEFTune scale='sequence')",
            "mc_estimator": "antithetic pairs: (loss(X+eps) + loss(X-eps))/2 - loss(X), same draws for every alpha",
            "hessian_estimator": "Hutchinson, Rademacher probes scaled by 1/sqrt(L_s d), double-backward HVPs",
            "fisher_estimator": "token-F, y' ~ model, one draw per sample",
            "loss": "mean cross-entropy over the batch's predicted positions, eval mode",
        },
    }
