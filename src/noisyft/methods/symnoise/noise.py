"""SymNoise: symmetric Bernoulli noise on the input embeddings, evaluated at X + delta and X - delta.

Paper: Yadav & Singh, "SymNoise: Advancing Language Model Fine-tuning with Symmetric Noise",
https://arxiv.org/abs/2312.01523

For a batch of input embeddings ``X`` (B, L, d), one training step evaluates the model on the symmetric pair::

    delta[i, t, :] = s[i, t, :] * alpha / sqrt(L_i(t) * d),   s iid uniform on {-1, +1}   (B, L, d)
    X_pair = concat_batch(X + delta, X - delta)                                           (2B, L, d)
    labels, attention_mask, position_ids repeated twice along the batch                   (2B, L)
    loss = mean over the label tokens of X_pair = (loss(X + delta) + loss(X - delta)) / 2

The two copies hold the same label tokens, so the token mean over the pair is exactly the average of the two
copies' losses. Expanding in ``delta``::

    (f(X + delta) + f(X - delta)) / 2 = f(X) + delta^T H delta / 2 + O(|delta|^4)

the gradient term cancels exactly (it is pure noise in one-sided NEFTune) and the curvature term ``H`` remains.

Scale and masking are NEFTune's (:func:`noisyft.methods.neftune.noise.token_sequence_lengths`): with
``scale="sequence"`` ``L_i(t)`` is the number of real tokens (``attention_mask``) of the sequence holding token t,
or of its document when ``position_ids`` restart at 0 inside a packed / padding-free row, and padding gets exactly
zero noise; ``scale="padded"`` uses the row width and noises padding too. Every noised entry has magnitude exactly
``alpha / sqrt(L_i d)``, hence variance ``alpha^2 / (L_i d)`` and a per-sequence squared norm of exactly ``alpha^2``
(NEFTune's uniform noise: ``alpha^2 / 3`` in expectation).

Source caveat: the noise law (iid fair +/-1 entries, ``alpha / sqrt(L d)``) and the doubled batch ``X + delta`` /
``X - delta`` with repeated labels are taken from the paper's abstract and from a third-party description of its
algorithm box; the algorithm box itself (arXiv v2) was not readable from where this was written. Check it against
the PDF before calling this "the paper's algorithm" in a release.

Where this differs from the paper:

* the paper writes ``L`` as the (padded) sequence length of the batch; the default here is each sequence's real
  length, with no noise on padding and per-document scale in packed rows (``scale="padded"`` is the literal form);
* the paper feeds the pair as one doubled batch; :func:`symmetric_pair_batch` builds exactly that. With a
  padding-free batch (one packed row plus ``position_ids``) the pair is two rows, so the attention backend must
  accept ``position_ids`` for more than one row, or the two copies can be run as two forwards whose losses are
  averaged (same value, same gradient).

Cost: the pair is a forward and backward on 2B rows, i.e. two forward passes' worth of tokens per step, about twice
a plain step. ``SymNoiseConfig(pair=False)`` is the one-copy variant (NEFTune's cost).

Pure torch, no Trainer: :func:`symnoise_noise` draws ``delta``; :func:`symmetric_pair` and
:func:`symmetric_pair_batch` build the doubled batch.
"""

from __future__ import annotations

import torch

from noisyft.methods.neftune.noise import token_sequence_lengths

SCALES = ("sequence", "padded")


def rademacher(
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """iid entries uniform on {-1, +1} (a symmetric Bernoulli draw), exact in every floating dtype."""
    signs = torch.empty(shape, dtype=dtype, device=device).bernoulli_(0.5, generator=generator)
    return signs.mul_(2).sub_(1)


def symnoise_noise(
    embeds: torch.Tensor,
    *,
    alpha: float,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    response_only: bool = False,
    scale: str = "sequence",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The SymNoise perturbation ``delta`` for a batch of input embeddings; a tensor shaped like ``embeds`` (B, L, d).

    ``delta[i, t, k] = +/- alpha / sqrt(L_i(t) * d)`` with iid fair signs. ``scale="sequence"``: ``L_i(t)`` is the
    real length of the sequence (or packed document, from ``position_ids``) of token t, and padding gets 0.
    ``scale="padded"``: ``L`` is the row width ``embeds.shape[1]`` and every token is noised.
    ``response_only=True`` zeroes ``delta`` where ``labels == -100`` (``L`` unchanged).
    The model is then evaluated at ``embeds + delta`` and ``embeds - delta`` (:func:`symmetric_pair`).
    """
    if scale not in SCALES:
        raise ValueError(f"SymNoise scale must be one of {SCALES}, got {scale!r}")
    if embeds.dim() != 3:
        raise ValueError(f"SymNoise embeds must be (batch, length, dim), got shape {tuple(embeds.shape)}")
    B, L, d = embeds.shape
    signs = rademacher(
        embeds.shape, dtype=embeds.dtype, device=embeds.device, generator=generator
    )  # (B, L, d)
    if scale == "padded":
        token_scale = torch.full((B, L), alpha / (L * d) ** 0.5, device=embeds.device)  # (B, L)
    else:
        lengths = token_sequence_lengths(
            (B, L), attention_mask=attention_mask, position_ids=position_ids, device=embeds.device
        )  # (B, L), 0 on padding
        token_scale = torch.where(lengths > 0, alpha * torch.rsqrt(lengths.clamp_min(1.0) * d), 0.0)  # (B, L)
    if response_only:
        if labels is None:
            raise ValueError("SymNoise response_only=True needs the labels (-100 marks tokens without loss)")
        token_scale = token_scale * (labels != -100).to(embeds.device).expand(B, L)  # (B, L)
    return signs.mul_(token_scale.to(embeds.dtype).unsqueeze(-1))  # (B, L, d)


def symmetric_pair(embeds: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``concat_batch(embeds + noise, embeds - noise)``: (B, L, d) -> (2B, L, d), copy ``+`` first."""
    if embeds.shape != noise.shape:
        raise ValueError(f"SymNoise noise shape {tuple(noise.shape)} != embeds shape {tuple(embeds.shape)}")
    return torch.cat([embeds + noise, embeds - noise], dim=0)  # (2B, L, d)


def _twice(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    rows = tensor.expand(batch, *tensor.shape[1:]) if tensor.shape[0] == 1 else tensor  # (B, ...)
    if rows.shape[0] != batch:
        raise ValueError(f"SymNoise pair: a batch tensor has {rows.shape[0]} rows, the embeddings {batch}")
    return torch.cat([rows, rows], dim=0)  # (2B, ...)


def symmetric_pair_batch(
    embeds: torch.Tensor,
    noise: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Model keyword arguments for the symmetric pair: ``inputs_embeds`` (2B, L, d) and the given batch tensors
    repeated twice along the batch (2B, L). ``model(**symmetric_pair_batch(...))`` returns the loss averaged over
    both copies. A (1, L) ``position_ids`` shared by all rows is expanded to (B, L) first.

    With Trainer's token-count normalisation (``num_items_in_batch``), the pair holds twice the label tokens: pass
    ``2 * num_items_in_batch`` so that the pair's loss stays the average of the two copies.
    """
    B = embeds.shape[0]
    batch = {"inputs_embeds": symmetric_pair(embeds, noise)}
    for name, tensor in (
        ("attention_mask", attention_mask),
        ("position_ids", position_ids),
        ("labels", labels),
    ):
        if tensor is not None:
            batch[name] = _twice(tensor.to(embeds.device), B)
    return batch
