"""The plug-in interface: how a method attaches to a transformers ``Trainer``, without importing one.

A plugin receives the trainer object as an argument (duck-typed: ``args``, ``state``, ``accelerator``) so the
methods stay free of Trainer imports; :class:`noisyft.trainer.NoisyTrainerMixin` calls these hooks. Each hook has a
do-nothing default, so a plugin implements only its lifecycle:

* train-time hook (NEFTune): ``before_train`` attaches, ``after_train`` detaches;
* one-shot perturbation (NoisyTune): ``before_train`` on a fresh run;
* loss term (Fisher penalty): ``compute_loss`` (at most one plugin per trainer: the ``loss`` slot);
* optimizer: ``create_optimizer``; module swap: ``on_init`` / ``before_save``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class MethodSetupError(ValueError):
    """A method that cannot attach to this model or these training arguments (raised before the first step)."""


class MethodPlugin:
    """Base class: one instance per trainer and method. ``name`` names the state file and the log prefix."""

    name: str = ""

    def __init__(self, config: Any, *, seed: int, rank: int):
        self.config = config
        self.seed = seed  # the training seed; a config's own ``seed`` wins where it has one
        self.rank = rank

    def on_init(self, trainer: Any) -> None:
        """Once, at the end of the trainer's ``__init__`` (the model is built and wrapped by PEFT, not yet by DDP)."""

    def before_train(self, trainer: Any, model: Any, *, fresh: bool) -> None:
        """At the start of ``train()``; ``fresh`` is False when resuming from a checkpoint."""

    def after_train(self, trainer: Any, model: Any) -> None:
        """At the end of ``train()``, also when it raised."""

    def on_batch(self, trainer: Any, model: Any, inputs: dict[str, Any]) -> None:
        """Before each training micro-batch's loss (diagnostics)."""

    def compute_loss(
        self,
        trainer: Any,
        model: Any,
        inputs: dict[str, Any],
        *,
        return_outputs: bool,
        num_items_in_batch: Any,
        default: Callable[[], Any],
    ) -> Any:
        """The training loss. ``default(batch=None, num_items=...)`` is the trainer's own loss, on this micro-batch or
        on another ``batch`` (a doubled one, say). Only plugins in the ``loss`` slot override it."""
        return default()

    def create_optimizer(self, trainer: Any, model: Any) -> Any | None:
        """An optimizer to use instead of the trainer's, or None."""
        return None

    def log_entries(self, trainer: Any) -> dict[str, float]:
        """Values logged next to the training loss (``<name>/...``) since the last call."""
        return {}

    def state_dict(self) -> dict[str, Any] | None:
        """Random-stream state saved with each checkpoint (one file per rank), or None."""
        return None

    def load_state_dict(self, state: dict[str, Any] | None, *, checkpoint: str) -> None:
        """Restore :meth:`state_dict` when resuming; ``state`` is None when the checkpoint has no file for it."""

    def summary(self) -> dict[str, Any]:
        """What the run's metrics.json records of this method (its settings and a few statistics)."""
        import dataclasses

        return dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else {}
