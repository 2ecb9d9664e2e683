"""noisyft: noise-regularized instruction fine-tuning on the Hugging Face stack.

The methods are importable at once (pure torch); the trainer and data helpers load transformers / TRL on
first use, so ``import noisyft`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "NEFTuneConfig": "noisyft.methods.neftune.config",
    "NEFTuneHook": "noisyft.methods.neftune.noise",
    "neftune_noise": "noisyft.methods.neftune.noise",
    "NoisyTuneConfig": "noisyft.methods.noisytune.config",
    "noisytune_": "noisyft.methods.noisytune.perturb",
    "SymNoiseConfig": "noisyft.methods.symnoise.config",
    "symnoise_noise": "noisyft.methods.symnoise.noise",
    "LNSRConfig": "noisyft.methods.lnsr.config",
    "lnsr_penalty": "noisyft.methods.lnsr.penalty",
    "MixoutConfig": "noisyft.methods.mixout.config",
    "mixout_": "noisyft.methods.mixout.mixout",
    "remove_mixout_": "noisyft.methods.mixout.mixout",
    "RecAdamConfig": "noisyft.methods.recadam.config",
    "RecAdam": "noisyft.methods.recadam.optimizer",
    "FisherConfig": "noisyft.methods.fisher.config",
    "fisher_penalty": "noisyft.methods.fisher.penalty",
    "NoisySFTTrainer": "noisyft.trainer",
    "NoisyTrainerMixin": "noisyft.trainer",
    "NoisyTrainer": "noisyft.trainer",
    "NoisyDPOTrainer": "noisyft.trainer",
    "NoisyKTOTrainer": "noisyft.trainer",
    "TrainConfig": "noisyft.config",
    "build_sft_dataset": "noisyft.data",
    "load_model_and_tokenizer": "noisyft.models",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'noisyft' has no attribute {name!r}")
