"""SymNoise settings. Torch-free: importing this module must not import torch (``--help`` stays instant)."""

from __future__ import annotations

from dataclasses import dataclass, field

from noisyft._checks import check_choice, check_int, check_number

SCALES = ("sequence", "padded")


@dataclass
class SymNoiseConfig:
    """SymNoise, Yadav & Singh, "SymNoise: Advancing Language Model Fine-tuning with Symmetric Noise",
    https://arxiv.org/abs/2312.01523

    In training forwards only, the input embeddings ``X`` (B, L, d) of a batch are evaluated at a symmetric pair::

        delta[i, t, :] = s * alpha / sqrt(L_i * d),    s ~ uniform on {-1, +1}^d   (iid entries)
        X_pair        = concat_batch(X + delta, X - delta)                          (2B, L, d)
        loss          = mean over the label tokens of both copies = (loss(X + delta) + loss(X - delta)) / 2

    Each noise entry has magnitude exactly ``alpha / sqrt(L_i d)``, so every sequence's noise has squared norm
    exactly ``alpha^2``. In the pair average the first-order (gradient) term of the loss in ``delta`` cancels
    exactly and what remains is the curvature term ``delta^T H delta / 2``: the "local curvature" the paper
    regularizes. ``L_i`` is the real length of sequence i, or of the packed document a token belongs to, as in
    noisyft's NEFTune (:func:`noisyft.methods.neftune.noise.token_sequence_lengths`); padding gets no noise.

    Cost: ``pair=True`` runs the forward and backward on 2B rows, i.e. twice the tokens of a plain step.

    Args:
        alpha (`float`, defaults to 5.0): noise scale, >= 0. The paper sweeps the same values as NEFTune (5, 10,
            15). ``alpha = 0`` gives two identical clean copies (the plain loss).
        pair (`bool`, defaults to True): evaluate both ``X + delta`` and ``X - delta`` (the paper's algorithm, two
            copies per step). ``False`` evaluates ``X + delta`` only: NEFTune's cost with +/-1 (Rademacher) noise
            instead of uniform noise, the simplified variant some implementations ship.
        scale (`str`, defaults to ``"sequence"``): what ``L`` is. ``"sequence"``: each sequence's (or packed
            document's) real length, no noise on padding. ``"padded"``: the batch row width with padding noised
            too, as a literal reading of the paper's ``alpha / sqrt(L d)`` on padded batches.
        response_only (`bool`, defaults to False): noise only tokens with a label (``labels != -100``); ``L`` still
            counts every real token. Off in the paper.
        seed (`int`, *optional*, defaults to None): seed of the noise stream; ``None`` takes the training seed.
    """

    alpha: float = field(
        default=5.0, metadata={"help": "noise scale alpha (>= 0): entries are +/- alpha/sqrt(L*d)"}
    )
    pair: bool = field(
        default=True,
        metadata={
            "help": "evaluate both X+delta and X-delta per step (the paper; 2x tokens); false: X+delta only"
        },
    )
    scale: str = field(
        default="sequence",
        metadata={"help": "L in alpha/sqrt(L*d): 'sequence' (real length, no noise on padding) or 'padded'"},
    )
    response_only: bool = field(default=False, metadata={"help": "noise only tokens that carry a label"})
    seed: int | None = field(
        default=None, metadata={"help": "seed of the noise stream (default: the training seed)"}
    )

    def __post_init__(self) -> None:
        check_number("SymNoise alpha", self.alpha, low=0)
        check_choice("SymNoise scale", self.scale, SCALES)
        for name in ("pair", "response_only"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SymNoise {name} must be true or false, got {getattr(self, name)!r}")
        check_int("SymNoise seed", self.seed, optional=True)
