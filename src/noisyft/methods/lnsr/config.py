"""LNSR settings. Torch-free: importing this module must not import torch (``--help`` stays instant)."""

from __future__ import annotations

from dataclasses import dataclass, field

from noisyft._checks import check_int, check_number


@dataclass
class LNSRConfig:
    """Layerwise noise stability regularization (LNSR), Hua et al., "Improving Pre-trained Language Model
    Fine-tuning with Noise Stability Regularization", https://arxiv.org/abs/2206.05658 (first version: "Noise
    Stability Regularization for Improving BERT Fine-tuning", https://arxiv.org/abs/2107.04835)

    Gaussian noise ``eps ~ N(0, sigma^2 I)`` is added to the input hidden states of decoder layer ``k`` (``layer``)
    on real tokens, and the training loss gets::

        coef * (1 / N) * sum_{l in layers} sum_{b, t real} || n(h_l(x + eps))[b, t] - n(h_l(x))[b, t] ||^2

    with ``n(h) = h / rms(h)`` per token (``normalize``) and the noise std ``sigma * rms(x_k)`` per token
    (``relative_sigma``): a pre-norm decoder's residual stream is not normalized (unlike the paper's BERT), so raw
    states and an absolute sigma make the penalty scale with the model's activation sizes (on SmolLM2-135M the raw
    penalty at sigma = 0.01 was 2,500x the loss; normalized, about 0.3x). Both off: the raw formula.

    ``h_l`` is the output of decoder layer ``l`` (the model's ``hidden_states[l + 1]``; for the last layer that is
    after the final norm), ``N`` the number of real tokens (``attention_mask``; with ``response_only`` the labelled
    ones). One extra forward of the decoder (no LM head) per step when the clean hidden states come from the main
    forward (``output_hidden_states=True``).

    Args:
        sigma (`float`, defaults to 0.01): std of the injected noise, per entry, >= 0: relative to each token's
            RMS at layer ``k`` (``relative_sigma``), else in the units of the hidden states. ``sigma = 0`` gives a
            zero penalty (without dropout).
        layer (`int`, defaults to 0): index ``k`` of the decoder layer at whose input the noise is injected (0: on
            the input embeddings as the first layer sees them). Must be < the model's number of layers.
        layers (`list[int]`, *optional*, defaults to None): which layers' outputs are penalized, each in
            ``[layer, num_layers)``. ``None``: all of them (the injection layer and every later one).
        coef (`float`, defaults to 1.0): weight of the penalty in the loss, >= 0.
        response_only (`bool`, defaults to False): penalize (and noise) only tokens that carry a label.
        relative_sigma (`bool`, defaults to True): noise std ``sigma * rms(x_k[b, t])`` per token.
        normalize (`bool`, defaults to True): compare RMS-normalized hidden states ``h / rms(h)`` per token.
        seed (`int`, *optional*, defaults to None): seed of the noise stream; ``None`` takes the training seed.
    """

    sigma: float = field(
        default=0.01, metadata={"help": "std of the Gaussian noise injected at the layer input (>= 0)"}
    )
    layer: int = field(default=0, metadata={"help": "index of the decoder layer whose input gets the noise"})
    layers: list[int] | None = field(
        default=None,
        metadata={"help": "layer indices (>= layer) whose outputs are penalized (default: all later)"},
    )
    coef: float = field(
        default=1.0, metadata={"help": "weight of the noise-stability penalty in the loss (>= 0)"}
    )
    response_only: bool = field(default=False, metadata={"help": "noise and penalize only labelled tokens"})
    relative_sigma: bool = field(
        default=True, metadata={"help": "noise std is sigma times each token's RMS at the noisy layer"}
    )
    normalize: bool = field(
        default=True, metadata={"help": "compare RMS-normalized hidden states (h / rms(h) per token)"}
    )
    seed: int | None = field(
        default=None, metadata={"help": "seed of the noise stream (default: the training seed)"}
    )

    def __post_init__(self) -> None:
        check_number("LNSR sigma", self.sigma, low=0)
        check_int("LNSR layer", self.layer, low=0)
        check_number("LNSR coef", self.coef, low=0)
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not self.layers:
                raise ValueError(
                    f"LNSR layers must be a non-empty list of layer indices or None, got {self.layers!r}"
                )
            for index in self.layers:
                check_int("LNSR layers entry", index, low=self.layer)
            self.layers = sorted(set(self.layers))
        for name in ("response_only", "relative_sigma", "normalize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LNSR {name} must be true or false, got {getattr(self, name)!r}")
        check_int("LNSR seed", self.seed, optional=True)
