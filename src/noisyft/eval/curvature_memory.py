"""How much memory the curvature analysis (:mod:`noisyft.eval.curvature`) needs, and sizing it to fit.

The Hutchinson step dominates: a double backward through the model on ``rows x T`` tokens, in float64 by
default. On SmolLM2-135M, 2 sequences of 634 tokens with 16 rows per pass would need about 170 GiB; the
analysis measures what is available first and either sizes itself down (fewer rows per pass, then shorter
or fewer sequences, logged) or stops with :class:`CurvatureMemoryError` naming the estimate and the budget,
instead of being killed by the kernel.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from noisyft._torch import unwrap_model

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class CurvatureMemoryError(ValueError):
    """The curvature analysis would not fit in memory even at its smallest size; the message has the figures."""


def available_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Memory the analysis may still use: CUDA free memory plus what torch's cache holds unused on a GPU,
    else ``MemAvailable`` from /proc/meminfo (whole RAM from ``os.sysconf`` where that is missing)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class MemoryPlan:
    """A size of the analysis and its estimated peak (bytes above what is allocated when it starts)."""

    n_sequences: int
    length: int
    max_batch_rows: int
    estimate_bytes: int


def estimate_peak_bytes(
    model: torch.nn.Module,
    *,
    n_sequences: int,
    length: int,
    max_batch_rows: int,
    samples: int,
    dtype: torch.dtype,
    copies_model: bool,
) -> int:
    """Estimated peak memory of :func:`curvature_report`, in bytes, from the model's shape and the batch size.

    The peak is the Hutchinson step: R = min(max_batch_rows // B, samples) * B rows of T tokens go through a
    forward pass kept for a double backward. Per token that keeps about three times the forward activations
    of every layer (the forward, the first backward's graph, the second backward's transients):
    3 * L * (8 d + 4 I + 2 H T) values, plus 6 V for the logits, their log-softmax and gradients; the float64
    copy of the model adds P values. Values are ``dtype``-sized. (The Monte-Carlo pass runs the same rows
    without a graph, the Fisher pass B rows: both stay below.) Calibrated against a measured peak on small
    Llama models (tests/test_eval_curvature_memory.py); expect agreement within a factor of about two.
    """
    config = getattr(unwrap_model(model), "config", None)
    d = unwrap_model(model).get_input_embeddings().embedding_dim
    layers = int(getattr(config, "num_hidden_layers", 0) or 1)
    intermediate = int(getattr(config, "intermediate_size", 0) or 4 * d)
    heads = int(getattr(config, "num_attention_heads", 0) or 1)
    vocab = int(getattr(config, "vocab_size", 0) or unwrap_model(model).get_input_embeddings().num_embeddings)
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = max(1, min(max(1, max_batch_rows // n_sequences), samples)) * n_sequences
    per_token = 3 * layers * (8 * d + 4 * intermediate + 2 * heads * length) + 6 * vocab
    params = sum(p.numel() for p in model.parameters()) if copies_model else 0
    return int(itemsize * (rows * length * per_token + params))


def plan_memory(
    model: torch.nn.Module,
    *,
    n_sequences: int,
    length: int,
    max_batch_rows: int,
    samples: int,
    dtype: torch.dtype,
    copies_model: bool,
    budget_bytes: int,
) -> MemoryPlan:
    """The largest size that fits `budget_bytes`: fewer rows per pass first (same result, more passes),
    then shorter sequences down to 64 tokens, then fewer sequences, then sequences down to 16 tokens.
    Raises :class:`CurvatureMemoryError` when even 1 sequence of 16 tokens does not fit."""

    def plan(b: int, t: int, rows: int) -> MemoryPlan:
        kw = dict(samples=samples, dtype=dtype, copies_model=copies_model)
        return MemoryPlan(
            b, t, rows, estimate_peak_bytes(model, n_sequences=b, length=t, max_batch_rows=rows, **kw)
        )

    b, t, rows = n_sequences, length, max_batch_rows
    candidate = plan(b, t, rows)
    while candidate.estimate_bytes > budget_bytes:
        if rows > b:
            rows = max(b, rows // 2)
        elif t > 64:
            t = max(64, t * 3 // 4)
        elif b > 1:
            b, rows = b - 1, b - 1
        elif t > 16:
            t = max(16, t * 3 // 4)
        else:
            raise CurvatureMemoryError(
                f"the curvature analysis needs about {candidate.estimate_bytes / 2**30:.2f} GiB even for one "
                f"sequence of {t} tokens, over the budget of {budget_bytes / 2**30:.2f} GiB of available memory; "
                "skip it (leave 'curvature' out of --analyses) or run it on a larger machine"
            )
        candidate = plan(b, t, rows)
    return candidate


def _fit_batch(batch: dict[str, torch.Tensor], n: int, length: int) -> dict[str, torch.Tensor]:
    """The first `n` sequences cut to `length` tokens, keeping only sequences left with a predicted position."""
    cut = {k: v[:, :length] for k, v in batch.items()}
    keep = (cut["labels"][:, 1:] != IGNORE_INDEX).any(dim=1).nonzero().flatten()[:n]
    if keep.numel() == 0:
        raise CurvatureMemoryError(
            f"within the first {length} tokens (the most that fit in memory) no sequence has a response token"
        )
    return {k: v[keep] for k, v in cut.items()}


def size_to_memory(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    dtype: torch.dtype,
    max_batch_rows: int,
    samples: int,
    budget: int | None,
    fit: bool,
) -> tuple[dict[str, torch.Tensor], int, dict[str, Any]]:
    """The batch and rows per pass that fit the memory budget, and a record of the decision.

    `dtype` is the dtype the analysis runs in (the model is copied to it when its parameters differ).
    Raises :class:`CurvatureMemoryError` when over budget and `fit` is False, or when nothing fits."""
    target = dtype
    copies = any(p.dtype != target for p in model.parameters())
    device = next(model.parameters()).device
    if budget is None:
        budget = int(0.8 * available_memory_bytes(device))
    B, T = batch["input_ids"].shape
    kw = dict(samples=samples, dtype=target, copies_model=copies)
    asked = estimate_peak_bytes(model, n_sequences=B, length=T, max_batch_rows=max_batch_rows, **kw)
    record: dict[str, Any] = {"estimate_bytes": asked, "budget_bytes": budget, "resized": False}
    if asked <= budget:
        return batch, max_batch_rows, record
    gib = f"about {asked / 2**30:.2f} GiB for {B} sequence(s) of {T} tokens, budget {budget / 2**30:.2f} GiB"
    if not fit:
        raise CurvatureMemoryError(
            f"the curvature analysis needs {gib}; lower curvature_examples or the length"
        )
    plan = plan_memory(
        model, n_sequences=B, length=T, max_batch_rows=max_batch_rows, budget_bytes=budget, **kw
    )
    fitted = _fit_batch(batch, plan.n_sequences, plan.length)
    logger.warning(
        "curvature: the analysis needs %s; running %d sequence(s) cut to %d tokens, %d rows per pass "
        "(about %.2f GiB)",
        gib,
        fitted["input_ids"].shape[0],
        plan.length,
        plan.max_batch_rows,
        plan.estimate_bytes / 2**30,
    )
    record.update(resized=True, estimate_bytes=plan.estimate_bytes, asked_bytes=asked)
    record.update(
        n_sequences=int(fitted["input_ids"].shape[0]), length=plan.length, max_batch_rows=plan.max_batch_rows
    )
    return fitted, plan.max_batch_rows, record
