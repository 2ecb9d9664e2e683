"""noisyft: noise-regularized instruction fine-tuning on the Hugging Face stack.

The regularizers are importable at once (pure torch); the trainer and data helpers load transformers / TRL on
first use, so ``import noisyft`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "NEFTuneConfig": "noisyft.regularizers.neftune",
    "NEFTuneHook": "noisyft.regularizers.neftune",
    "neftune_noise": "noisyft.regularizers.neftune",
    "NoisyTuneConfig": "noisyft.regularizers.noisytune",
    "noisytune_": "noisyft.regularizers.noisytune",
    "FisherConfig": "noisyft.regularizers.fisher",
    "fisher_penalty": "noisyft.regularizers.fisher",
    "NoisySFTTrainer": "noisyft.trainer",
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
