"""NEFTune as a train-time forward hook: attached for the duration of ``train()``, noise stream checkpointed."""

from __future__ import annotations

import logging
from typing import Any

from noisyft.methods.base import MethodPlugin

from .noise import NEFTuneHook

logger = logging.getLogger(__name__)


class NEFTunePlugin(MethodPlugin):
    name = "neftune"

    def __init__(self, config, *, seed: int, rank: int):
        super().__init__(config, seed=seed, rank=rank)
        self.hook = NEFTuneHook(config, seed=seed, rank=rank)
        self._noise_stats: list[float] = []

    def on_init(self, trainer: Any) -> None:
        alpha = getattr(trainer.args, "neftune_noise_alpha", None)
        if alpha is not None:
            raise ValueError(
                f"Both noisyft NEFTune (alpha={self.config.alpha}) and transformers' neftune_noise_alpha={alpha} are "
                "set: the noise would be applied twice. Remove `neftune_noise_alpha` from the training arguments "
                "(noisyft's scale='padded' reproduces it)."
            )

    def before_train(self, trainer: Any, model: Any, *, fresh: bool) -> None:
        self.hook.attach(model)

    def after_train(self, trainer: Any, model: Any) -> None:
        self.hook.detach()

    def log_entries(self, trainer: Any) -> dict[str, float]:
        entries = {"neftune/alpha": self.config.alpha}
        for key, value in self.hook.pop_stats().items():
            entries[f"neftune/{key}"] = value
            if key == "noise_to_embed_norm":
                self._noise_stats.append(value)
        return entries

    def state_dict(self) -> dict[str, Any]:
        return self.hook.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None, *, checkpoint: str) -> None:
        if state is None:
            logger.warning("%s has no NEFTune state: the noise stream restarts from its seed", checkpoint)
            return
        self.hook.load_state_dict(state)

    def summary(self) -> dict[str, Any]:
        stats = self._noise_stats
        return {**super().summary(), "mean_noise_to_embed_norm": sum(stats) / len(stats) if stats else None}
