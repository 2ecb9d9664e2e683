"""Mixout as a module change for the duration of ``train()``: attached to the chosen Linear layers before the first
step, removed afterwards (the saved model is a plain transformers model either way)."""

from __future__ import annotations

from typing import Any

import torch

from noisyft.methods.base import MethodPlugin

from .mixout import mixout_, remove_mixout_


def snapshot_trainable(model) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable parameters, by name (the "pretrained" weights before NoisyTune)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class MixoutPlugin(MethodPlugin):
    name = "mixout"

    def __init__(self, config, *, seed: int, rank: int):
        super().__init__(config, seed=seed, rank=rank)
        self.targets: dict[str, torch.Tensor] | None = None
        self.layers: list[str] = []

    def on_init(self, trainer) -> None:
        if self.config.seed is not None and getattr(trainer.args, "gradient_checkpointing", False):
            raise ValueError(
                "Mixout with its own seed cannot be replayed by gradient checkpointing's recomputation: leave "
                "mixout.seed unset (masks then come from torch's RNG, seeded by the training seed)"
            )
        # u = the weights before NoisyTune perturbs them (the paper's pretrained weights), unless target=start
        if self.config.target == "pretrained" and trainer.plugin("noisytune") is not None:
            self.targets = snapshot_trainable(trainer.model)

    def before_train(self, trainer, model, *, fresh: bool) -> None:
        generator = None
        if self.config.seed is not None:
            generator = torch.Generator().manual_seed(self.config.seed + self.rank)
        self.layers = mixout_(
            trainer.model,
            p=self.config.p,
            include=self.config.include,
            exclude=self.config.exclude,
            targets=self.targets,
            generator=generator,
        )
        self.targets = None  # the buffers hold u now

    def after_train(self, trainer, model) -> None:
        remove_mixout_(trainer.model)

    def log_entries(self, trainer) -> dict[str, float]:
        return {"mixout/p": self.config.p}

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "layers": len(self.layers)}
