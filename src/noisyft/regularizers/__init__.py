"""Pure-torch regularizers. Three lifecycles: NEFTune is a train-time forward hook, NoisyTune a one-shot
perturbation before training, a Fisher penalty an extra loss term. None of these modules imports a Trainer."""

from .fisher import FisherConfig, fisher_penalty
from .neftune import NEFTuneConfig, NEFTuneHook, neftune_noise, token_sequence_lengths
from .noisytune import NoisyTuneConfig, noisytune_

__all__ = [
    "FisherConfig",
    "NEFTuneConfig",
    "NEFTuneHook",
    "NoisyTuneConfig",
    "fisher_penalty",
    "neftune_noise",
    "noisytune_",
    "token_sequence_lengths",
]
