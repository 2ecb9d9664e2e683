"""Pure-torch regularizers. Three lifecycles: NEFTune is a train-time forward hook, NoisyTune a one-shot
perturbation before training. None of these modules imports a Trainer."""

from .neftune import NEFTuneConfig, NEFTuneHook, neftune_noise, token_sequence_lengths
from .noisytune import NoisyTuneConfig, noisytune_

__all__ = [
    "NEFTuneConfig",
    "NEFTuneHook",
    "NoisyTuneConfig",
    "neftune_noise",
    "noisytune_",
    "token_sequence_lengths",
]
