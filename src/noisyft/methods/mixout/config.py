"""Mixout settings. Torch-free: importing this module must not import torch (``--help`` stays instant)."""

from __future__ import annotations

from dataclasses import dataclass, field

from noisyft._checks import check_choice, check_int, check_number, check_regex

TARGETS = ("pretrained", "start")


@dataclass
class MixoutConfig:
    """Mixout, Lee, Cho & Kang, "Mixout: Effective Regularization to Finetune Large-scale Pretrained Language
    Models", ICLR 2020, https://arxiv.org/abs/1909.11299

    In training forwards, every entry of each selected ``nn.Linear`` weight ``w`` is replaced by::

        W_eff = (M * w + (1 - M) * u - p * u) / (1 - p),     M ~ Bernoulli(1 - p) iid per entry

    with ``u`` the target weights (a frozen copy taken when Mixout is applied). ``E[W_eff] = w`` and
    ``Var[W_eff] = p / (1 - p) * (w - u)^2`` per entry; evaluation and ``generate`` use ``w`` itself. The dropout
    modules next to the selected layers are set to p = 0, as the paper replaces dropout by mixout (see
    :func:`noisyft.methods.mixout.mixout.mixout_` for exactly which). Frozen layers (``requires_grad=False``, e.g.
    a LoRA base) are skipped: their ``w`` always equals ``u``, so mixout would be the identity.

    Args:
        p (`float`, defaults to 0.1): mixout probability, in [0, 1). The paper uses up to 0.9 for BERT-large with
            dropout off. ``p = 0`` is plain training.
        include (`str`, *optional*, defaults to None): regular expression searched (``re.search``) in each
            ``nn.Linear``'s module name; only matching layers are selected. ``None``: every trainable Linear (with
            LoRA: the ``lora_A`` / ``lora_B`` adapters, ``u`` = their values at the call, i.e. their init).
        exclude (`str`, *optional*, defaults to ``"lm_head"``): regular expression; matching layers are left alone.
            The default keeps the output head out (it is tied to the input embeddings in many small models, which
            Mixout refuses). ``None`` selects it too.
        target (`str`, defaults to ``"pretrained"``): what ``u`` is when NoisyTune also runs: ``"pretrained"``, the
            weights before NoisyTune's perturbation (the paper's ``u``); ``"start"``, the weights training starts
            from (after it). Without NoisyTune both are the loaded weights.
        seed (`int`, *optional*, defaults to None): ``None`` draws the masks from torch's global RNG like
            ``nn.Dropout`` (seeded by the training seed; safe under gradient checkpointing, whose recomputation
            restores that RNG). An integer uses a dedicated generator, which gradient checkpointing cannot replay.
    """

    p: float = field(
        default=0.1, metadata={"help": "mixout probability p in [0, 1): chance an entry is swapped for u"}
    )
    include: str | None = field(
        default=None,
        metadata={"help": "regex on Linear module names to select (default: every trainable Linear)"},
    )
    exclude: str | None = field(
        default="lm_head", metadata={"help": "regex on Linear module names to leave alone (default: lm_head)"}
    )
    target: str = field(
        default="pretrained",
        metadata={"help": "u with NoisyTune: 'pretrained' (before its perturbation) or 'start' (after it)"},
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "mask seed; default: torch's global RNG (the training seed), like dropout"},
    )

    def __post_init__(self) -> None:
        check_number("Mixout p", self.p, low=0, high=1, high_open=True)
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"Mixout {name} must be a regular expression or None, got {value!r}")
            check_regex(f"Mixout {name}", value)
        check_choice("Mixout target", self.target, TARGETS)
        check_int("Mixout seed", self.seed, optional=True)
