"""The methods, one folder each, and the registry that makes a method one flag away.

A method is a unit (PEFT-style), found in one folder ``noisyft/methods/<name>/``:

* ``config.py``: its settings dataclass (paper link and formula in the docstring, each field with its help text
  and validation). Torch-free, so ``noisyft --help`` stays instant; the settings layer turns it into a YAML
  section ``<name>: {...}`` and flags ``--<name>.<field>`` (alias ``--<name>-<field>``).
* the pure-torch component (``noise.py``, ``perturb.py``, ``penalty.py``, ...): no Trainer import.
* ``plugin.py``: how it attaches to a transformers ``Trainer`` (a :class:`~noisyft.methods.base.MethodPlugin`):
  a train-time hook, a one-shot perturbation, a loss term, an optimizer or a module swap.

Adding a method = that folder + one :class:`MethodSpec` line below + one ``<name>: Config | None`` field in
``TrainConfig``. The trainer, the recipe and the CLI pick it up from here: ``--method a+b`` combinations are
checked against the specs (two methods claiming the same ``slot`` cannot combine).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["REGISTRY", "MethodSpec", "method_name", "parse_method"]


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows of a method without importing it (no torch)."""

    name: str
    config: str  # "module:Class" of the torch-free settings dataclass
    plugin: str  # "module:Class" of the MethodPlugin
    lifecycle: str  # one line for --help and the README
    paper: str
    slots: tuple[str, ...] = ()  # resources it takes over: two methods with one slot cannot combine
    needs_labels: bool = False  # needs token labels (refused by trainers without them)

    @property
    def needs_token_loss(self) -> bool:
        """Needs a token-level loss with labels (it reads or replaces it): refused by DPO / KTO."""
        return self.needs_labels or "loss" in self.slots

    def config_class(self) -> type:
        return _load(self.config)

    def plugin_class(self) -> type:
        return _load(self.plugin)


def _load(target: str) -> type:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


# The order is the order of application: NoisyTune perturbs the weights before Mixout / RecAdam take their
# anchors (when those are the weights at the start) and the train-time methods attach.
REGISTRY: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "noisytune",
            "noisyft.methods.noisytune.config:NoisyTuneConfig",
            "noisyft.methods.noisytune.plugin:NoisyTunePlugin",
            "one-shot weight perturbation before training",
            "https://arxiv.org/abs/2202.12024",
        ),
        MethodSpec(
            "mixout",
            "noisyft.methods.mixout.config:MixoutConfig",
            "noisyft.methods.mixout.plugin:MixoutPlugin",
            "training-time mix of the weights with their pretrained values (module change)",
            "https://arxiv.org/abs/1909.11299",
            slots=("weight-mixing",),
        ),
        MethodSpec(
            "recadam",
            "noisyft.methods.recadam.config:RecAdamConfig",
            "noisyft.methods.recadam.plugin:RecAdamPlugin",
            "Adam with an annealed pull towards the pretrained weights (optimizer)",
            "https://arxiv.org/abs/2004.12651",
            slots=("optimizer",),
        ),
        MethodSpec(
            "neftune",
            "noisyft.methods.neftune.config:NEFTuneConfig",
            "noisyft.methods.neftune.plugin:NEFTunePlugin",
            "train-time noise on the input embeddings (forward hook)",
            "https://arxiv.org/abs/2310.05914",
            slots=("embedding-noise",),
        ),
        MethodSpec(
            "symnoise",
            "noisyft.methods.symnoise.config:SymNoiseConfig",
            "noisyft.methods.symnoise.plugin:SymNoisePlugin",
            "symmetric +/- noise on the input embeddings, both copies in the loss",
            "https://arxiv.org/abs/2312.01523",
            slots=("embedding-noise", "loss"),
        ),
        MethodSpec(
            "lnsr",
            "noisyft.methods.lnsr.config:LNSRConfig",
            "noisyft.methods.lnsr.plugin:LNSRPlugin",
            "noise-stability penalty on later hidden states (loss term, one extra forward)",
            "https://arxiv.org/abs/2206.05658",
            slots=("loss",),
        ),
        MethodSpec(
            "fisher",
            "noisyft.methods.fisher.config:FisherConfig",
            "noisyft.methods.fisher.plugin:FisherPlugin",
            "explicit Fisher penalty (token-F / logit-F) added to the loss",
            "https://arxiv.org/abs/2310.05914",
            slots=("loss",),
            needs_labels=True,
        ),
    )
}


def parse_method(text: str) -> tuple[str, ...]:
    """``"noisytune+neftune"`` -> ``("noisytune", "neftune")`` in registry order; ``"none"`` -> ``()``.

    Raises ValueError for an unknown name, a repeated one, or two methods that claim the same slot."""
    if not isinstance(text, str):
        raise ValueError(f"method must be a string such as 'neftune' or 'noisytune+neftune', got {text!r}")
    parts = [p.strip().lower() for p in text.split("+") if p.strip()]
    if parts in ([], ["none"]):
        return ()
    valid = ", ".join(["none", *REGISTRY])
    for p in parts:
        if p not in REGISTRY:
            import difflib

            close = difflib.get_close_matches(p, list(REGISTRY), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown method {p!r} in {text!r}.{hint} Methods: {valid}, joined with '+'")
        if parts.count(p) > 1:
            raise ValueError(f"method {p!r} is given twice in {text!r}")
    claimed: dict[str, str] = {}
    for p in parts:
        for slot in REGISTRY[p].slots:
            if slot in claimed:
                raise ValueError(
                    f"methods {claimed[slot]!r} and {p!r} cannot combine: both take over the {slot} "
                    f"({REGISTRY[claimed[slot]].lifecycle}; {REGISTRY[p].lifecycle})"
                )
            claimed[slot] = p
    return tuple(name for name in REGISTRY if name in parts)


def method_name(names) -> str:
    """The canonical method string: registry order joined with '+', or ``"none"``."""
    names = tuple(names)
    return "+".join(n for n in REGISTRY if n in names) or "none"
