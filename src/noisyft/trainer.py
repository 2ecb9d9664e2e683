"""The thin integration layer: noisyft's methods in a transformers ``Trainer`` (TRL's ``SFTTrainer`` first).

Everything that is not about noise (packing, padding-free batches, completion-only loss, PEFT, DDP/FSDP through
accelerate) is TRL's and transformers' own. :class:`NoisyTrainerMixin` only calls each method's plug-in
(``noisyft.methods.<name>.plugin``) at the right moments: before and after ``train()``, around the training loss,
when logging, and when a checkpoint saves or restores the random streams (one file per rank and method).

Moving an existing TRL script over takes three lines::

    from noisyft import NoisySFTTrainer, NEFTuneConfig          # 1. import
    trainer = NoisySFTTrainer(                                   # 2. the class
        model=model, args=SFTConfig(...), train_dataset=ds,
        neftune=NEFTuneConfig(alpha=5),                          # 3. instead of SFTConfig(neftune_noise_alpha=5)
    )
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from trl import DPOTrainer, KTOTrainer, SFTTrainer

from .methods import REGISTRY
from .methods.base import MethodPlugin, MethodSetupError
from .methods.fisher.plugin import FisherDiagnosticPlugin

logger = logging.getLogger(__name__)

STATE_FILE = "noisyft_{name}_rank{rank}.pt"


def _config_for(name: str, value: Any) -> Any:
    cls = REGISTRY[name].config_class()
    if name == "neftune" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return cls(alpha=float(value))  # shorthand: neftune=5
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")
    return value


@contextlib.contextmanager
def _setup_errors(plugin: MethodPlugin):
    """A ValueError while a method attaches is the user's setting or model: one line naming the method."""
    try:
        yield
    except MethodSetupError:
        raise
    except ValueError as exc:
        raise MethodSetupError(f"{plugin.name}: {exc}") from exc


class NonFiniteError(RuntimeError):
    """The training loss or gradient became nan / inf: the run stops before the optimizer applies it."""


class _NonFiniteGuard(TrainerCallback):
    """Before every optimizer step: the micro-batch losses and the gradient must be finite, or training stops with
    an error naming the step. The weights are then still the last good ones; no checkpoint or model is written
    from a non-finite step. One host sync per optimizer step."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        t = self.trainer
        grads = [p.grad for p in t.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        bad_loss = t._noisyft_bad_loss
        t._noisyft_bad_loss = None
        if bool(not torch.isfinite(norm)) or (bad_loss is not None and bool(bad_loss)):
            what = "loss" if bad_loss is not None and bool(bad_loss) else "gradient"
            raise NonFiniteError(
                f"the training {what} became nan/inf at step {state.global_step + 1}; stopped before the optimizer "
                "step (the last checkpoint, if any, is intact; no model was written). Lower the learning rate or "
                "the noise, or check the data."
            )


class NoisyTrainerMixin:
    """Attaches noisyft's methods to a ``transformers.Trainer`` subclass: ``class T(NoisyTrainerMixin, Trainer)``.

    Every registered method is a keyword argument taking its config (``neftune=NEFTuneConfig(...)``,
    ``noisytune=NoisyTuneConfig(...)``, ``fisher=FisherConfig(...)``, ...); ``fisher_diagnostic_steps=N`` logs a
    noise-free Fisher-trace estimate every N steps in any run. Other arguments go to the trainer unchanged.
    """

    # A trainer whose loss is a token-level cross-entropy on labelled tokens (SFT, plain LM training). Trainers
    # with another loss (DPO, KTO) set this to False: the methods that replace or extend that loss are refused.
    noisyft_token_loss: bool = True

    def __init__(self, *args, fisher_diagnostic_steps: int | None = None, **kwargs):
        configs = {n: _config_for(n, kwargs.pop(n)) for n in REGISTRY if kwargs.get(n) is not None}
        for n in REGISTRY:
            kwargs.pop(n, None)
        if not self.noisyft_token_loss:
            for n in configs:
                if REGISTRY[n].needs_token_loss:
                    raise MethodSetupError(
                        f"{n} ({REGISTRY[n].lifecycle}) needs a token-level loss with labels, which "
                        f"{type(self).__name__} does not have; use it with NoisySFTTrainer / NoisyTrainer"
                    )
            if fisher_diagnostic_steps is not None:
                raise MethodSetupError(
                    f"fisher_diagnostic_steps needs token labels, which {type(self).__name__} lacks"
                )
        super().__init__(*args, **kwargs)
        seed, rank = self.args.seed, self.args.process_index
        self.noisyft_plugins: list[MethodPlugin] = [
            REGISTRY[n].plugin_class()(cfg, seed=seed, rank=rank) for n, cfg in configs.items()
        ]
        if fisher_diagnostic_steps is not None:
            self.noisyft_plugins.append(FisherDiagnosticPlugin(fisher_diagnostic_steps, seed=seed, rank=rank))
        owners = [p for p in self.noisyft_plugins if "loss" in getattr(REGISTRY.get(p.name), "slots", ())]
        self._noisyft_loss_owner = owners[0] if owners else None
        for plugin in self.noisyft_plugins:
            with _setup_errors(plugin):
                plugin.on_init(self)
        self._noisyft_bad_loss: torch.Tensor | None = None
        self.add_callback(_NonFiniteGuard(self))

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        bad = ~torch.isfinite(loss.detach())  # kept on the device: checked once per optimizer step
        self._noisyft_bad_loss = bad if self._noisyft_bad_loss is None else (self._noisyft_bad_loss | bad)
        return loss

    def plugin(self, name: str) -> MethodPlugin | None:
        """The attached plug-in of method ``name`` (``"neftune"``, ...), or None."""
        return next((p for p in self.noisyft_plugins if p.name == name), None)

    @property
    def neftune_hook(self):
        plugin = self.plugin("neftune")
        return None if plugin is None else plugin.hook

    @property
    def noisytune_report(self):
        plugin = self.plugin("noisytune")
        return None if plugin is None else plugin.records

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        finished = self._finished_checkpoint_state(resume_from_checkpoint)
        if finished is not None:
            # transformers checks max_steps only after a step: resuming here would train one step too many
            from transformers.trainer_utils import TrainOutput

            logger.warning(
                "checkpoint %s is at step %d of %d: training is complete; its weights are loaded, no step is run",
                resume_from_checkpoint,
                finished.global_step,
                finished.max_steps,
            )
            self._load_from_checkpoint(resume_from_checkpoint)
            self.state = finished
            return TrainOutput(finished.global_step, float("nan"), {"resumed_finished_checkpoint": 1.0})
        fresh = resume_from_checkpoint in (None, False)
        attached: list[MethodPlugin] = []
        try:
            for plugin in self.noisyft_plugins:
                with _setup_errors(plugin):
                    plugin.before_train(self, self.model, fresh=fresh)
                attached.append(plugin)
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            for plugin in reversed(attached):
                plugin.after_train(self, self.model)

    def _finished_checkpoint_state(self, checkpoint):
        """The checkpoint's TrainerState when it already reached this run's max_steps (else None)."""
        if (
            not isinstance(checkpoint, (str, os.PathLike))
            or self.is_deepspeed_enabled
            or self.is_fsdp_enabled
        ):
            return None
        path = os.path.join(checkpoint, "trainer_state.json")
        if not os.path.isfile(path):
            return None
        from transformers import TrainerState

        state = TrainerState.load_from_json(path)
        target = self.args.max_steps if self.args.max_steps > 0 else state.max_steps
        return state if target > 0 and state.global_step >= target else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        parent = super().compute_loss

        def default(batch=None, num_items=num_items_in_batch):
            """The trainer's own loss, on ``batch`` (default: this micro-batch) and ``num_items`` tokens."""
            return parent(model, inputs if batch is None else batch, return_outputs, num_items)

        if not model.training:
            return default()
        for plugin in self.noisyft_plugins:
            plugin.on_batch(self, model, inputs)
        if self._noisyft_loss_owner is None:
            return default()
        return self._noisyft_loss_owner.compute_loss(
            self,
            model,
            inputs,
            return_outputs=return_outputs,
            num_items_in_batch=num_items_in_batch,
            default=default,
        )

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is None:
            for plugin in self.noisyft_plugins:
                optimizer = plugin.create_optimizer(self, self.model)
                if optimizer is not None:
                    self.optimizer = optimizer
                    return optimizer
        return super().create_optimizer(*args, **kwargs)

    # -- checkpoints: the random streams travel with the RNG states --------------------------------------------
    def _state_path(self, folder: str, plugin: MethodPlugin) -> str:
        return os.path.join(folder, STATE_FILE.format(name=plugin.name, rank=self.args.process_index))

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        for plugin in self.noisyft_plugins:
            state = plugin.state_dict()
            if state is not None:
                torch.save(state, self._state_path(output_dir, plugin))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        for plugin in self.noisyft_plugins:
            path = self._state_path(checkpoint, plugin)
            state = torch.load(path, weights_only=True) if os.path.isfile(path) else None
            plugin.load_state_dict(state, checkpoint=checkpoint)

    # -- logging -----------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            for plugin in self.noisyft_plugins:
                logs.update(plugin.log_entries(self))
        super().log(logs, start_time)

    def noisyft_summary(self) -> dict[str, Any]:
        """Each attached method's settings and statistics, for a run's metrics.json."""
        return {p.name: p.summary() for p in self.noisyft_plugins}


class NoisySFTTrainer(NoisyTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` plus noisyft's methods.

    Args:
        neftune (`NEFTuneConfig` or `float`, *optional*): NEFTune settings; a float is shorthand for
            ``NEFTuneConfig(alpha=value)``. Must not be combined with ``args.neftune_noise_alpha`` (that is
            transformers' padded-length implementation; the noise would be added twice).
        noisytune (`NoisyTuneConfig`, *optional*): NoisyTune settings, applied to the trainable parameters once,
            at the start of a fresh ``train()``.
        fisher (`FisherConfig`, *optional*): explicit Fisher penalty added to the training loss,
            ``loss + coef(step) * R``, with R normalized like the loss (same token count under gradient
            accumulation). Logged as ``fisher/penalty`` (R), ``fisher/coef`` (effective coefficient) and
            ``fisher/ce_loss`` (the loss without the penalty); ``loss`` is the total.
        fisher_diagnostic_steps (`int`, *optional*): every N optimizer steps, log ``fisher/trace_estimate``: a
            token-F estimate of Tr(F_X) on the current batch, noise-free (model in eval mode) and without
            gradient to the parameters, to watch curvature during any run (plain, NEFTune, Fisher).
        *args, **kwargs: passed to ``trl.SFTTrainer`` unchanged; any other registered method by its name.
    """


class NoisyTrainer(NoisyTrainerMixin, Trainer):
    """``transformers.Trainer`` plus noisyft's methods (same keyword arguments as :class:`NoisySFTTrainer`)."""


class NoisyDPOTrainer(NoisyTrainerMixin, DPOTrainer):
    """``trl.DPOTrainer`` plus noisyft's methods that do not change the loss (NEFTune, NoisyTune, Mixout, RecAdam).

    Noise reaches only the policy's training forward that records gradients: the reference log-probabilities
    (an adapter-disabled PEFT model, a separate reference model, or precomputed ones) are computed without
    gradients and get none, and neither do generation and evaluation."""

    noisyft_token_loss = False


class NoisyKTOTrainer(NoisyTrainerMixin, KTOTrainer):
    """``trl.KTOTrainer`` plus noisyft's methods that do not change the loss (see :class:`NoisyDPOTrainer`)."""

    noisyft_token_loss = False
