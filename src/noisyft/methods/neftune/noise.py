"""NEFTune: noisy input embeddings during instruction fine-tuning.

Paper: Jain et al., "NEFTune: Noisy Embeddings Improve Instruction Finetuning", https://arxiv.org/abs/2310.05914

During training only, every input token embedding of sequence i gets iid noise

    noise[i, t, :] = U(-1, 1)^d * alpha / sqrt(L_i * d)

with d the embedding width and L_i the *real* length of sequence i. Two readings of L exist:

* ``scale="sequence"`` (our default, the paper's own training code): L_i counts the real tokens of sequence i
  (``attention_mask``); padding gets exactly zero noise, left or right. In packed or padding-free rows,
  ``position_ids`` restart at 0 at every document, and each token is scaled by the length of *its own* document.
* ``scale="padded"`` (transformers' ``neftune_noise_alpha`` and every tool built on it): L is the row width of the
  batch tensor and padding is noised too. A sequence of length l padded to Lmax then gets sqrt(l / Lmax) of the
  intended noise, and a packed row of k documents about 1/sqrt(k) of it. Kept to reproduce such runs exactly:
  with ``generator=None`` the draw is bit-identical to transformers' hook under the same global RNG state.

The noise is added to the *output* of the model's input-embedding module (``get_input_embeddings()``). For models
whose embedding module scales its output (Gemma multiplies by sqrt(hidden_size)), the noise therefore lands on the
scaled embeddings, i.e. on exactly what the first decoder layer sees, as in transformers. ``d`` is the embedding
width in both cases.

The module is pure torch: :func:`neftune_noise` computes the noise, :class:`NEFTuneHook` attaches it to a model as a
train-time forward hook. Wiring into a Trainer lives in ``noisyft.methods.neftune.plugin``.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

import torch

from noisyft._torch import rank_seed, unwrap_model

from .config import DISTRIBUTIONS, SCALES, NEFTuneConfig

logger = logging.getLogger(__name__)


def token_sequence_lengths(
    shape: tuple[int, int],
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Length of the sequence (or packed document) each token belongs to; 0 on padding.

    Returns a float tensor of shape (B, L). Without ``position_ids`` a row is one sequence of
    ``attention_mask.sum()`` real tokens. With ``position_ids``, a document starts at every position 0
    (and at the row start), and its length counts its real tokens only.
    """
    B, L = shape
    if attention_mask is not None:
        real = attention_mask.to(device=device, dtype=torch.bool).expand(B, L)  # (B, L)
    else:
        real = torch.ones(B, L, dtype=torch.bool, device=device)
    if position_ids is None:
        return real.sum(dim=1, keepdim=True).to(torch.float32) * real  # (B, L)
    pos = position_ids.to(device).expand(B, L)  # (B, L)
    starts = pos == 0
    starts[:, 0] = True
    doc = starts.cumsum(dim=1) - 1  # (B, L) document index within the row
    doc = doc + torch.arange(B, device=doc.device).unsqueeze(1) * L  # unique over the batch
    counts = torch.zeros(B * L, dtype=torch.float32, device=doc.device)
    counts.index_add_(0, doc.reshape(-1), real.reshape(-1).to(torch.float32))  # (B*L,) tokens per document
    return counts[doc] * real  # (B, L)


def neftune_noise(
    embeds: torch.Tensor,
    *,
    alpha: float,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    response_only: bool = False,
    distribution: str = "uniform",
    scale: str = "sequence",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """NEFTune noise for a batch of input embeddings; returns a tensor shaped like ``embeds`` (B, L, d).

    noise[i, t] = u * alpha / sqrt(L_i(t) * d), u iid per entry:

    * ``distribution="uniform"``: u ~ U(-1, 1), the paper's method (per-entry std 1/sqrt(3)).
    * ``distribution="gaussian"``: u ~ N(0, 1), the paper's Gaussian ablation, which replaced the uniform draw
      by a standard normal under the same alpha / sqrt(L d) scale. Its std is therefore sqrt(3) times the
      uniform's; pass ``alpha / sqrt(3)`` to compare the two at equal variance.

    ``scale="sequence"``: L_i(t) is the number of real tokens (``attention_mask``) of the sequence holding token t,
    or of its document when ``position_ids`` restart at 0 inside a packed / padding-free row; padding gets 0.
    ``scale="padded"``: L is the row width ``embeds.shape[1]`` and every token is noised, drawn exactly like
    transformers' ``neftune_post_forward_hook`` (same values under the same RNG state when ``generator`` is None).

    ``response_only=True`` zeroes the noise where ``labels == -100`` (the sequence length is unchanged).
    The expected squared norm of a sequence's uniform noise is alpha^2 / 3, whatever its length.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if embeds.dim() != 3:
        raise ValueError(f"embeds must be (batch, length, dim), got shape {tuple(embeds.shape)}")
    B, L, d = embeds.shape

    if scale == "padded":
        # Mirrors transformers.integrations.neftune.neftune_post_forward_hook op for op, so that the same RNG
        # state gives the same numbers.
        mag_norm = alpha / torch.sqrt(torch.tensor(L * d))
        if distribution == "uniform":
            noise = torch.zeros_like(embeds).uniform_(-mag_norm, mag_norm, generator=generator)  # (B, L, d)
        else:
            noise = torch.randn(embeds.shape, generator=generator, dtype=embeds.dtype, device=embeds.device)
            noise.mul_(mag_norm.to(embeds.dtype))
    else:
        lengths = token_sequence_lengths(
            (B, L), attention_mask=attention_mask, position_ids=position_ids, device=embeds.device
        )  # (B, L), 0 on padding
        token_scale = torch.where(lengths > 0, alpha * torch.rsqrt(lengths.clamp_min(1.0) * d), 0.0)  # (B, L)
        if distribution == "uniform":
            noise = torch.empty_like(embeds).uniform_(-1.0, 1.0, generator=generator)  # (B, L, d)
        else:
            noise = torch.randn(embeds.shape, generator=generator, dtype=embeds.dtype, device=embeds.device)
        noise.mul_(token_scale.to(embeds.dtype).unsqueeze(-1))
    if response_only:
        if labels is None:
            raise ValueError("response_only=True needs the labels (-100 marks tokens without loss)")
        keep = (labels != -100).to(embeds.device).expand(B, L)  # (B, L)
        noise.mul_(keep.to(embeds.dtype).unsqueeze(-1))
    return noise


_BATCH_KEYS = ("attention_mask", "position_ids", "labels")


@functools.cache
def _positional_names(model_cls: type) -> tuple[str, ...]:
    params = inspect.signature(model_cls.forward).parameters
    return tuple(n for n, p in params.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD)


class NEFTuneHook:
    """Adds NEFTune noise to a model's input embeddings in training forward passes.

    Attaches two hooks to the transformers model under any PEFT / DDP / FSDP wrapper: a forward pre-hook on the
    model that reads the batch's ``attention_mask``, ``position_ids`` and ``labels`` from the call's keyword
    arguments, and a forward hook on ``get_input_embeddings()`` that adds the noise. Noise is added only when the
    embedding module is in training mode *and* autograd is recording, so ``eval()``, ``evaluate`` and ``generate``
    (which runs under ``no_grad``) see clean embeddings. :meth:`detach` removes both hooks; a saved model carries
    no trace of them.

    The noise stream is a dedicated ``torch.Generator`` seeded from (seed, rank), whose state
    :meth:`state_dict` / :meth:`load_state_dict` save and restore with a checkpoint, so a resumed run continues the
    same stream. ``use_global_rng=True`` draws from torch's global RNG instead (as transformers does).
    """

    def __init__(self, config: NEFTuneConfig, *, seed: int = 0, rank: int = 0):
        self.config = config
        self.seed = rank_seed(config.seed if config.seed is not None else seed, rank)
        self.rank = rank
        self.generator: torch.Generator | None = None
        self._pending_state: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._batch: dict[str, torch.Tensor | None] = {}
        self._embedding: torch.nn.Module | None = None
        # Noise statistic, accumulated without host syncs: sum over noised tokens of ||noise_t|| / ||embed_t||.
        self._ratio_sum: torch.Tensor | None = None
        self._ratio_count: torch.Tensor | None = None
        self.calls = 0

    # -- attaching ---------------------------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module) -> NEFTuneHook:
        if self._handles:
            raise RuntimeError("this NEFTuneHook is already attached; detach() it first")
        base = unwrap_model(model)
        if not hasattr(base, "get_input_embeddings"):
            raise TypeError(
                f"{type(base).__name__} has no get_input_embeddings(); NEFTune needs a transformers model"
            )
        embedding = base.get_input_embeddings()
        if getattr(embedding, "neftune_noise_alpha", None) is not None:
            raise ValueError(
                "transformers' own NEFTune hook is active on this model (neftune_noise_alpha is set): noise would be "
                "applied twice. Unset `neftune_noise_alpha` in the training arguments and use noisyft's NEFTune only."
            )
        self._embedding = embedding
        self._handles = [
            base.register_forward_pre_hook(self._capture_batch, with_kwargs=True),
            base.register_forward_hook(self._release_batch, always_call=True),
            embedding.register_forward_hook(self._add_noise),
        ]
        logger.info(
            "embedding noise attached to %s.%s: %s",
            type(base).__name__,
            type(embedding).__name__,
            self.config,
        )
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._batch = {}
        self._embedding = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # -- hooks -------------------------------------------------------------------------------------------------
    def _capture_batch(self, module, args, kwargs):
        batch = {key: kwargs.get(key) for key in _BATCH_KEYS}
        if args:  # model(input_ids, attention_mask, ...) called positionally: map the arguments to names
            names = _positional_names(type(module))
            batch.update({n: a for n, a in zip(names, args, strict=False) if n in _BATCH_KEYS})
        self._batch = batch
        return None

    def _release_batch(self, module, args, output):
        self._batch = {}
        return None

    def _add_noise(self, module, inputs, output):
        if not (module.training and torch.is_grad_enabled()) or self.config.alpha == 0:
            return None
        L = output.shape[1]
        batch = {k: v for k, v in self._batch.items() if v is not None and v.shape[-1] == L}
        noise = self.noise(output, batch)  # (B, L, d)
        self._record(output, noise)
        self.calls += 1
        return output + noise

    def noise(self, embeds: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The noise for one batch of embeddings (subclasses draw another kind through the same hook)."""
        return neftune_noise(
            embeds,
            alpha=self.config.alpha,
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            labels=batch.get("labels"),
            response_only=self.config.response_only,
            distribution=self.config.distribution,
            scale=self.config.scale,
            generator=None if self.config.use_global_rng else self._generator(embeds.device),
        )

    # -- generator and its state ---------------------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            generator = torch.Generator(device=device)
            if self._pending_state is not None:
                generator.set_state(self._pending_state)
                self._pending_state = None
            else:
                generator.manual_seed(self.seed)
            self.generator = generator
        return self.generator

    def state_dict(self) -> dict[str, Any]:
        state = self.generator.get_state() if self.generator is not None else self._pending_state
        return {"seed": self.seed, "rank": self.rank, "calls": self.calls, "generator_state": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rank", self.rank) != self.rank:
            logger.warning(
                "NEFTune state saved by rank %s is loaded on rank %s", state.get("rank"), self.rank
            )
        self.seed = int(state["seed"])
        self.calls = int(state.get("calls", 0))
        self.generator = None
        self._pending_state = state.get("generator_state")

    # -- statistics --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _record(self, embeds: torch.Tensor, noise: torch.Tensor) -> None:
        # fp32 accumulation without materialising fp32 copies of (B, L, d) tensors
        noise_norm = torch.linalg.vector_norm(noise, dim=-1, dtype=torch.float32)  # (B, L)
        embed_norm = torch.linalg.vector_norm(embeds, dim=-1, dtype=torch.float32)  # (B, L)
        noised = noise_norm > 0
        ratio = torch.where(noised, noise_norm / embed_norm.clamp_min(1e-12), 0.0)
        if self._ratio_sum is None or self._ratio_sum.device != ratio.device:
            self._ratio_sum = torch.zeros((), device=ratio.device)
            self._ratio_count = torch.zeros((), device=ratio.device)
        self._ratio_sum += ratio.sum()
        self._ratio_count += noised.sum()

    def pop_stats(self) -> dict[str, float]:
        """Mean ||noise|| / ||embedding|| over noised tokens since the last call (empty if nothing was noised)."""
        if self._ratio_sum is None or float(self._ratio_count) == 0:
            return {}
        stats = {"noise_to_embed_norm": float(self._ratio_sum / self._ratio_count)}
        self._ratio_sum = None
        self._ratio_count = None
        return stats
