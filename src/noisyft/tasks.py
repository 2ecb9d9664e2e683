"""What differs between `noisyft train --task sft|dpo|kto`: TRL's config class, the trainer class, and the task's own
training arguments. Everything else (the run folder, the common arguments, the methods) is the recipe's, shared.

* ``sft``: ``trl.SFTConfig`` + :class:`~noisyft.trainer.NoisySFTTrainer` on pre-tokenized instruction data.
* ``dpo``: ``trl.DPOConfig`` + :class:`~noisyft.trainer.NoisyDPOTrainer` on preference pairs. The reference is the
  policy with its LoRA adapter disabled under ``--lora``, else a frozen copy of the starting model (TRL's own).
* ``kto``: ``trl.KTOConfig`` + :class:`~noisyft.trainer.NoisyKTOTrainer` on prompt / completion / label records.
"""

from __future__ import annotations

from typing import Any

from .config import TrainConfig


def trl_config_class(task: str) -> type:
    from trl import DPOConfig, KTOConfig, SFTConfig

    return {"sft": SFTConfig, "dpo": DPOConfig, "kto": KTOConfig}[task]


def trainer_class(task: str) -> type:
    from .trainer import NoisyDPOTrainer, NoisyKTOTrainer, NoisySFTTrainer

    return {"sft": NoisySFTTrainer, "dpo": NoisyDPOTrainer, "kto": NoisyKTOTrainer}[task]


def task_arguments(cfg: TrainConfig) -> dict[str, Any]:
    """The task's own TRL arguments (the common ones, batch size, learning rate, ..., are the recipe's)."""
    if cfg.task == "dpo":
        return {"beta": cfg.dpo.beta, "loss_type": [cfg.dpo.loss_type]}
    if cfg.task == "kto":
        kto = cfg.kto
        return {
            "beta": kto.beta,
            "loss_type": kto.loss_type,
            "desirable_weight": kto.desirable_weight,
            "undesirable_weight": kto.undesirable_weight,
        }
    return {
        "packing": cfg.packing,
        "packing_strategy": cfg.packing_strategy,
        "padding_free": cfg.padding_free,
        # our data set carries `assistant_masks`, which TRL always applies; completion_only_loss is for its
        # prompt/completion format and must stay off here
        "completion_only_loss": False,
    }


def double_noise_error(cfg: TrainConfig) -> str | None:
    """Why ``--sft-arg neftune_noise_alpha=...`` (transformers' NEFTune) is refused here, or None when it is not."""
    if "neftune_noise_alpha" not in cfg.sft_args:
        return None
    if cfg.task != "sft":
        return (
            f"sft_args sets transformers' neftune_noise_alpha, which in --task {cfg.task} noises the reference pass too "
            "(it checks only module.training); use --method neftune (noisyft's NEFTune noises the policy's training "
            "forward only)"
        )
    if cfg.uses_neftune:
        return (
            "sft_args sets transformers' neftune_noise_alpha while --method uses noisyft's NEFTune: the noise would "
            "be applied twice. Use --neftune.scale padded to reproduce transformers' scaling instead."
        )
    return None
