"""The thin integration layer: TRL's SFTTrainer with noisyft's regularizers wired in.

Everything that is not about noise (packing, padding-free batches, completion-only loss, PEFT, DDP/FSDP through
accelerate) is TRL's and transformers' own. This file only:

* applies NoisyTune once, before the first step of a fresh run (not when resuming: the checkpoint already holds the
  perturbed-then-trained weights);
* attaches the NEFTune hook for the duration of ``train()`` and removes it afterwards;
* saves / restores the NEFTune noise stream with each checkpoint, one file per rank;
* logs the methods' settings and a noise statistic next to the loss.

Moving an existing TRL script over takes three lines::

    from noisyft import NoisySFTTrainer, NEFTuneConfig          # 1. import
    trainer = NoisySFTTrainer(                                   # 2. the class
        model=model, args=SFTConfig(...), train_dataset=ds,
        neftune=NEFTuneConfig(alpha=5),                          # 3. instead of SFTConfig(neftune_noise_alpha=5)
    )
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from trl import SFTTrainer

from ._io import atomic_write_json
from .regularizers.neftune import NEFTuneConfig, NEFTuneHook
from .regularizers.noisytune import NoisyTuneConfig

logger = logging.getLogger(__name__)

NEFTUNE_STATE_FILE = "noisyft_neftune_rank{rank}.pt"


class NoisySFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` plus NEFTune (train-time embedding noise) and NoisyTune (one-shot weight noise).

    Args:
        neftune (`NEFTuneConfig` or `float`, *optional*): NEFTune settings; a float is shorthand for
            ``NEFTuneConfig(alpha=value)``. Must not be combined with ``args.neftune_noise_alpha`` (that is
            transformers' padded-length implementation; the noise would be added twice).
        noisytune (`NoisyTuneConfig`, *optional*): NoisyTune settings, applied to the trainable parameters once,
            at the start of a fresh ``train()``.
        *args, **kwargs: passed to ``trl.SFTTrainer`` unchanged.
    """

    def __init__(
        self,
        *args,
        neftune: NEFTuneConfig | float | None = None,
        noisytune: NoisyTuneConfig | None = None,
        **kwargs,
    ):
        if isinstance(neftune, (int, float)) and not isinstance(neftune, bool):
            neftune = NEFTuneConfig(alpha=float(neftune))
        if neftune is not None and not isinstance(neftune, NEFTuneConfig):
            raise TypeError(f"neftune must be a NEFTuneConfig or a float, got {type(neftune).__name__}")
        if noisytune is not None and not isinstance(noisytune, NoisyTuneConfig):
            raise TypeError(f"noisytune must be a NoisyTuneConfig, got {type(noisytune).__name__}")
        super().__init__(*args, **kwargs)
        if neftune is not None and self.args.neftune_noise_alpha is not None:
            raise ValueError(
                f"Both noisyft NEFTune (alpha={neftune.alpha}) and transformers' neftune_noise_alpha="
                f"{self.args.neftune_noise_alpha} are set: the noise would be applied twice. Remove "
                "`neftune_noise_alpha` from the training arguments (noisyft's scale='padded' reproduces it)."
            )
        self.neftune_config = neftune
        self.noisytune_config = noisytune
        self.noisytune_report: list[Any] | None = None
        self.neftune_hook: NEFTuneHook | None = None
        if neftune is not None:
            self.neftune_hook = NEFTuneHook(neftune, seed=self.args.seed, rank=self.args.process_index)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        fresh = resume_from_checkpoint in (None, False)
        if self.noisytune_config is not None and fresh and self.noisytune_report is None:
            self._apply_noisytune()
        if self.neftune_hook is not None:
            self.neftune_hook.attach(self.model)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if self.neftune_hook is not None:
                self.neftune_hook.detach()

    def _apply_noisytune(self) -> None:
        cfg = self.noisytune_config
        seed = cfg.seed if cfg.seed is not None else self.args.seed
        # Same seed on every rank: all replicas must start from the same perturbed weights.
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.noisytune_report = cfg.apply(self.model, generator=generator)
        if self.is_world_process_zero():
            self.save_noisytune_report(os.path.join(self.args.output_dir, "noisytune_report.json"))

    def save_noisytune_report(self, path: str) -> None:
        """Per-tensor NoisyTune report (name, numel, std, relative change, skip reason) as JSON."""
        atomic_write_json(path, [dataclasses.asdict(r) for r in self.noisytune_report or []])

    # -- checkpoints: the noise stream travels with the RNG states -----------------------------------------
    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.neftune_hook is not None:
            path = os.path.join(output_dir, NEFTUNE_STATE_FILE.format(rank=self.args.process_index))
            torch.save(self.neftune_hook.state_dict(), path)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if self.neftune_hook is None or checkpoint is None:
            return
        path = os.path.join(checkpoint, NEFTUNE_STATE_FILE.format(rank=self.args.process_index))
        if not os.path.isfile(path):
            logger.warning(
                "%s has no NEFTune state (%s): the noise stream restarts from its seed", checkpoint, path
            )
            return
        self.neftune_hook.load_state_dict(torch.load(path, weights_only=True))

    # -- logging -----------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            if self.neftune_hook is not None:
                logs["neftune/alpha"] = self.neftune_config.alpha
                for key, value in self.neftune_hook.pop_stats().items():
                    logs[f"neftune/{key}"] = value
            if self.noisytune_config is not None:
                logs["noisytune/lambda"] = self.noisytune_config.lam
        super().log(logs, start_time)
