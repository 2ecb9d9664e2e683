"""NEFTune settings (torch-free, so ``noisyft --help`` stays instant)."""

from __future__ import annotations

from dataclasses import dataclass, field

from noisyft._checks import check_choice, check_int, check_number

DISTRIBUTIONS = ("uniform", "gaussian")
SCALES = ("sequence", "padded")


@dataclass
class NEFTuneConfig:
    """NEFTune, https://arxiv.org/abs/2310.05914 (Jain et al.): noisy input embeddings during fine-tuning.

    In training forward passes only, every input token embedding gets iid noise

        noise[i, t, :] = U(-1, 1)^d * alpha / sqrt(L_i * d)

    with d the embedding width and L_i the real length of sequence i (``scale="sequence"``: padding is never
    noised, each packed document is scaled by its own length) or the padded row width (``scale="padded"``, as
    transformers' ``neftune_noise_alpha``).

    Args:
        alpha (`float`, defaults to 5.0): noise scale. The paper uses 5, 10 and 15. ``alpha = 0`` adds nothing.
        distribution (`str`, defaults to ``"uniform"``): ``"uniform"`` draws U(-1, 1); ``"gaussian"`` draws
            N(0, 1) instead (the paper's ablation).
        scale (`str`, defaults to ``"sequence"``): what ``L`` is. ``"sequence"``: each sequence's (or packed
            document's) real length, no noise on padding. ``"padded"``: the batch row width, noise on padding too,
            as transformers' ``neftune_noise_alpha`` does.
        response_only (`bool`, defaults to False): noise only tokens that carry a label (``labels != -100``).
            ``L`` still counts every real token of the sequence. Off in the paper.
        seed (`int`, *optional*): seed of the noise stream. ``None`` takes the training seed. Every data-parallel
            rank derives its own stream from (seed, rank). Ignored with ``use_global_rng=True``.
        use_global_rng (`bool`, defaults to False): draw from torch's global RNG instead of a dedicated generator.
            Needed to reproduce a transformers ``neftune_noise_alpha`` run bit for bit (with ``scale="padded"``).
    """

    alpha: float = field(default=5.0, metadata={"help": "noise scale alpha (paper: 5, 10, 15)"})
    distribution: str = field(default="uniform", metadata={"help": "uniform (paper) or gaussian"})
    scale: str = field(
        default="sequence",
        metadata={
            "help": "sequence: L = each sequence's real length, no noise on padding (paper's code); padded: "
            "L = row width, as transformers' neftune_noise_alpha"
        },
    )
    response_only: bool = field(default=False, metadata={"help": "noise response tokens only"})
    seed: int | None = field(default=None, metadata={"help": "noise seed (None: the training seed)"})
    use_global_rng: bool = field(
        default=False,
        metadata={
            "help": "draw from torch's global RNG as transformers does (with scale padded: bit-identical to a "
            "neftune_noise_alpha run); default: a dedicated per-rank stream",
            "aliases": ("global_rng",),
        },
    )

    def __post_init__(self):
        check_number("NEFTune alpha", self.alpha, low=0)
        check_choice("NEFTune distribution", self.distribution, DISTRIBUTIONS)
        check_choice("NEFTune scale", self.scale, SCALES)
        check_int("NEFTune seed", self.seed, low=0, optional=True)
