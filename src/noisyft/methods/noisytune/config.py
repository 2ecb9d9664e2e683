"""NoisyTune settings (torch-free, so ``noisyft --help`` stays instant)."""

from __future__ import annotations

from dataclasses import dataclass, field

from noisyft._checks import check_choice, check_int, check_number, check_regex

DISTRIBUTIONS = ("uniform", "gaussian")
MODES = ("matrix", "global")


@dataclass
class NoisyTuneConfig:
    """https://arxiv.org/abs/2202.12024 (NoisyTune, Wu et al., ACL 2022): perturb the weights once, then fine-tune.

    Before fine-tuning, every selected parameter tensor ``W`` is perturbed once, in place::

        uniform  (the paper):  W <- W + U(-lam/2, +lam/2) * std(W)
        gaussian (ablation):   W <- W + N(0, sigma^2) * std(W),   sigma = lam / sqrt(12)

    ``std(W)`` is the standard deviation of the tensor's own values (``mode="matrix"``, the paper), so every
    matrix receives noise in proportion to its own spread. ``sigma = lam / sqrt(12)`` is the standard
    deviation of ``U(-lam/2, lam/2)``, so both distributions add noise of the same variance and the
    ``lam`` values are comparable; only the shape (bounded vs. heavy tails) differs.

    The expected relative change of a tensor is ``||dW|| / ||W|| ~= lam / sqrt(12) * std(W) / rms(W)``:
    about ``0.043`` for ``lam=0.15`` on a zero-mean weight matrix (where ``std ~= rms``), much less on
    tensors whose values sit far from zero (such as trained norm weights near 1).

    Attributes:
        lam: Noise intensity lambda, >= 0 (0 leaves the weights unchanged). Default ``0.15``, the
            paper's default.
        distribution: ``"uniform"`` (the paper) or ``"gaussian"`` (ablation, same variance). Default
            ``"uniform"``.
        mode: ``"matrix"``: one std per tensor (the paper). ``"global"``: one std computed over the values
            of all perturbed tensors together (ablation). Default ``"matrix"``.
        include: Regular expression searched (``re.search``) in each parameter name; when set, only
            matching parameters are perturbed. Default ``None`` (all).
        exclude: Regular expression; matching parameters are left alone, e.g. ``"embed_tokens"`` as the
            paper did for multilingual models. Applied after ``include``. Default ``None``.
        trainable_only: Only perturb parameters with ``requires_grad=True``, so the frozen base of a
            LoRA model is not damaged. Default ``True``.
        seed: Seed for the noise (a fresh CPU ``torch.Generator``); ``None`` uses torch's global RNG
            (the trainer passes the training seed). Default ``None``.

    Tensors with zero std (constant, e.g. freshly initialized LayerNorm weights, as the paper notes) or a
    single element (std undefined) are skipped in both modes. Tied weights (one Parameter under two names)
    are perturbed once.
    """

    lam: float = field(
        default=0.15, metadata={"help": "noise intensity lambda (paper: 0.15)", "aliases": ("lambda",)}
    )
    distribution: str = field(
        default="uniform", metadata={"help": "uniform (paper) or gaussian (same variance)"}
    )
    mode: str = field(default="matrix", metadata={"help": "matrix (per-tensor std, paper) or global"})
    include: str | None = field(default=None, metadata={"help": "regex: perturb only matching params"})
    exclude: str | None = field(default=None, metadata={"help": "regex: leave matching params alone"})
    trainable_only: bool = field(
        default=True,
        metadata={"help": "perturb only parameters with requires_grad (LoRA: not the frozen base)"},
    )
    seed: int | None = field(default=None, metadata={"help": "noise seed (None: the training seed)"})

    def __post_init__(self) -> None:
        check_number("NoisyTune lambda", self.lam, low=0)
        self.lam = float(self.lam)
        check_choice("NoisyTune distribution", self.distribution, DISTRIBUTIONS)
        check_choice("NoisyTune mode", self.mode, MODES)
        for name in ("include", "exclude"):
            pattern = getattr(self, name)
            if pattern is not None and not isinstance(pattern, str):
                raise ValueError(f"NoisyTune {name} must be a regex string or None, got {pattern!r}")
            check_regex(f"NoisyTune {name}", pattern)
        if not isinstance(self.trainable_only, bool):
            raise ValueError(f"NoisyTune trainable_only must be a bool, got {self.trainable_only!r}")
        check_int("NoisyTune seed", self.seed, low=0, optional=True)
