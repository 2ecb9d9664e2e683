"""SymNoise in a training step: the symmetric pair ``X + delta``, ``X - delta`` as one doubled batch through the
trainer's own loss (``pair=True``), or one noisy copy through an embedding hook like NEFTune's (``pair=False``)."""

from __future__ import annotations

from typing import Any

import torch

from noisyft._torch import SeededStream, rank_seed, unwrap_model
from noisyft.methods.base import MethodPlugin
from noisyft.methods.neftune.noise import NEFTuneHook

from .noise import symmetric_pair_batch, symnoise_noise


class _OneCopyHook(NEFTuneHook):
    """NEFTune's hook machinery (batch capture, train-only, checkpointed stream) drawing SymNoise's signs."""

    def noise(self, embeds, batch):
        return symnoise_noise(
            embeds,
            alpha=self.config.alpha,
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            labels=batch.get("labels"),
            response_only=self.config.response_only,
            scale=self.config.scale,
            generator=self._generator(embeds.device),
        )


class SymNoisePlugin(MethodPlugin):
    """Logs ``symnoise/noise_to_embed_norm``; ``pair=True`` costs two forward passes' worth of tokens per step."""

    name = "symnoise"

    def __init__(self, config, *, seed: int, rank: int):
        super().__init__(config, seed=seed, rank=rank)
        base = config.seed if config.seed is not None else seed
        self.stream = SeededStream(rank_seed(base, rank, stream="symnoise"))
        self.hook = _OneCopyHook(config, seed=base, rank=rank) if not config.pair else None
        if self.hook is not None:
            self.hook.seed = self.stream.seed
        self._ratio: list[torch.Tensor] = []

    def before_train(self, trainer, model, *, fresh: bool) -> None:
        if self.hook is not None:
            self.hook.attach(model)

    def after_train(self, trainer, model) -> None:
        if self.hook is not None:
            self.hook.detach()

    def compute_loss(self, trainer, model, inputs, *, return_outputs, num_items_in_batch, default):
        if self.hook is not None or "input_ids" not in inputs:
            return default()
        cfg = self.config
        embeds = unwrap_model(model).get_input_embeddings()(inputs["input_ids"])  # (B, L, d)
        delta = symnoise_noise(
            embeds,
            alpha=cfg.alpha,
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
            labels=inputs.get("labels"),
            response_only=cfg.response_only,
            scale=cfg.scale,
            generator=self.stream(embeds.device),
        )  # (B, L, d)
        with torch.no_grad():
            ratio = delta.norm(dim=-1) / embeds.norm(dim=-1).clamp_min(1e-12)  # (B, L)
            self._ratio.append(ratio[delta.norm(dim=-1) > 0].mean())
        pair = symmetric_pair_batch(
            embeds,
            delta,
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
            labels=inputs.get("labels"),
        )  # (2B, ...): the loss is the mean over both copies
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", *pair)}
        num_items = None if num_items_in_batch is None else 2 * num_items_in_batch
        return default({**extra, **pair}, num_items)

    def log_entries(self, trainer) -> dict[str, float]:
        entries = {"symnoise/alpha": self.config.alpha}
        if self.hook is not None:
            stats = self.hook.pop_stats()
            if stats:
                entries["symnoise/noise_to_embed_norm"] = stats["noise_to_embed_norm"]
        elif self._ratio:
            entries["symnoise/noise_to_embed_norm"] = float(torch.stack(self._ratio).mean())
            self._ratio = []
        return entries

    def state_dict(self) -> dict[str, Any] | None:
        if self.hook is not None:
            return self.hook.state_dict()
        return self.stream.state_dict()

    def load_state_dict(self, state, *, checkpoint: str) -> None:
        if state is None:
            return
        if self.hook is not None:
            self.hook.load_state_dict(state)
        else:
            self.stream.load_state_dict(state)
