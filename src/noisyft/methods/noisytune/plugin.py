"""NoisyTune as a one-shot perturbation at the start of a fresh ``train()`` (a resumed run is already perturbed)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from noisyft._io import atomic_write_json
from noisyft.methods.base import MethodPlugin

from .perturb import apply_noisytune

REPORT_FILE = "noisytune_report.json"


class NoisyTunePlugin(MethodPlugin):
    name = "noisytune"

    def __init__(self, config, *, seed: int, rank: int):
        super().__init__(config, seed=seed, rank=rank)
        self.records: list[Any] | None = None

    def before_train(self, trainer: Any, model: Any, *, fresh: bool) -> None:
        if not fresh or self.records is not None:
            return
        import torch

        seed = self.config.seed if self.config.seed is not None else self.seed
        # Same seed on every rank: all replicas must start from the same perturbed weights.
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.records = apply_noisytune(self.config, trainer.model, generator=generator)
        if trainer.is_world_process_zero():
            self.save_report(os.path.join(trainer.args.output_dir, REPORT_FILE))

    def save_report(self, path: str) -> None:
        """Per-tensor report (name, numel, std, relative change, skip reason) as JSON."""
        atomic_write_json(path, [dataclasses.asdict(r) for r in self.records or []])

    def log_entries(self, trainer: Any) -> dict[str, float]:
        return {"noisytune/lambda": self.config.lam}

    def summary(self) -> dict[str, Any]:
        perturbed = sum(1 for r in self.records or [] if not getattr(r, "skipped", None))
        return {**super().summary(), "perturbed_tensors": perturbed}
