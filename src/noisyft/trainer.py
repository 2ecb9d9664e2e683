"""The thin integration layer: TRL's SFTTrainer with noisyft's regularizers wired in.

Everything that is not about noise (packing, padding-free batches, completion-only loss, PEFT, DDP/FSDP through
accelerate) is TRL's and transformers' own. This file only:

* applies NoisyTune once, before the first step of a fresh run (not when resuming: the checkpoint already holds the
  perturbed-then-trained weights);
* attaches the NEFTune hook for the duration of ``train()`` and removes it afterwards;
* adds the Fisher penalty (token-F / logit-F) to the loss, on the same forward pass TRL computes the loss with, and
  optionally logs a no-gradient estimate of the same quantity every N steps during any run;
* saves / restores the NEFTune noise stream with each checkpoint, one file per rank;
* logs the methods' settings and a noise statistic next to the loss.

Moving an existing TRL script over takes three lines::

    from noisyft import NoisySFTTrainer, NEFTuneConfig          # 1. import
    trainer = NoisySFTTrainer(                                   # 2. the class
        model=model, args=SFTConfig(...), train_dataset=ds,
        neftune=NEFTuneConfig(alpha=5),                          # 3. instead of SFTConfig(neftune_noise_alpha=5)
    )
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from typing import Any

import torch
from trl import SFTTrainer

from ._io import atomic_write_json
from .regularizers.fisher import (
    FisherConfig,
    capture_forward,
    fisher_penalty,
    fisher_penalty_from_logits,
    logits_from_hidden,
    next_token_targets,
    predicted_positions,
)
from .regularizers.neftune import NEFTuneConfig, NEFTuneHook, rank_seed, unwrap_model
from .regularizers.noisytune import NoisyTuneConfig

logger = logging.getLogger(__name__)

NEFTUNE_STATE_FILE = "noisyft_neftune_rank{rank}.pt"
FISHER_STATE_FILE = "noisyft_fisher_rank{rank}.pt"


class NoisySFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` plus NEFTune (train-time embedding noise) and NoisyTune (one-shot weight noise).

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
        *args, **kwargs: passed to ``trl.SFTTrainer`` unchanged.
    """

    def __init__(
        self,
        *args,
        neftune: NEFTuneConfig | float | None = None,
        noisytune: NoisyTuneConfig | None = None,
        fisher: FisherConfig | None = None,
        fisher_diagnostic_steps: int | None = None,
        **kwargs,
    ):
        if isinstance(neftune, (int, float)) and not isinstance(neftune, bool):
            neftune = NEFTuneConfig(alpha=float(neftune))
        if neftune is not None and not isinstance(neftune, NEFTuneConfig):
            raise TypeError(f"neftune must be a NEFTuneConfig or a float, got {type(neftune).__name__}")
        if noisytune is not None and not isinstance(noisytune, NoisyTuneConfig):
            raise TypeError(f"noisytune must be a NoisyTuneConfig, got {type(noisytune).__name__}")
        if fisher is not None and not isinstance(fisher, FisherConfig):
            raise TypeError(f"fisher must be a FisherConfig, got {type(fisher).__name__}")
        if fisher_diagnostic_steps is not None and fisher_diagnostic_steps < 1:
            raise ValueError(f"fisher_diagnostic_steps must be >= 1, got {fisher_diagnostic_steps}")
        super().__init__(*args, **kwargs)
        if neftune is not None and self.args.neftune_noise_alpha is not None:
            raise ValueError(
                f"Both noisyft NEFTune (alpha={neftune.alpha}) and transformers' neftune_noise_alpha="
                f"{self.args.neftune_noise_alpha} are set: the noise would be applied twice. Remove "
                "`neftune_noise_alpha` from the training arguments (noisyft's scale='padded' reproduces it)."
            )
        self.neftune_config = neftune
        self.noisytune_config = noisytune
        self.noisytune_report: list[Any] | None = None
        self.neftune_hook: NEFTuneHook | None = None
        if neftune is not None:
            self.neftune_hook = NEFTuneHook(neftune, seed=self.args.seed, rank=self.args.process_index)
        self.fisher_config = fisher
        self.fisher_diagnostic_steps = fisher_diagnostic_steps
        seed = fisher.seed if fisher is not None and fisher.seed is not None else self.args.seed
        # y' sampling: one stream per rank. Gate (``probability``): one stream shared by all ranks.
        self._fisher_seeds = (rank_seed(seed, self.args.process_index) ^ 0x5F15, seed)
        self._fisher_generators: dict[str, torch.Generator] = {}
        self._fisher_pending_state: dict[str, torch.Tensor] | None = None
        self._fisher_logs = {"ce_loss": 0.0, "penalty": 0.0, "applied": 0.0, "steps": 0.0}
        self._fisher_diag: list[float] = []
        self._fisher_diag_step = -1
        self._fisher_share_head: bool | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        fresh = resume_from_checkpoint in (None, False)
        if self.noisytune_config is not None and fresh and self.noisytune_report is None:
            self._apply_noisytune()
        if self.neftune_hook is not None:
            self.neftune_hook.attach(self.model)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if self.neftune_hook is not None:
                self.neftune_hook.detach()

    def _apply_noisytune(self) -> None:
        cfg = self.noisytune_config
        seed = cfg.seed if cfg.seed is not None else self.args.seed
        # Same seed on every rank: all replicas must start from the same perturbed weights.
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.noisytune_report = cfg.apply(self.model, generator=generator)
        if self.is_world_process_zero():
            self.save_noisytune_report(os.path.join(self.args.output_dir, "noisytune_report.json"))

    def save_noisytune_report(self, path: str) -> None:
        """Per-tensor NoisyTune report (name, numel, std, relative change, skip reason) as JSON."""
        atomic_write_json(path, [dataclasses.asdict(r) for r in self.noisytune_report or []])

    # -- Fisher penalty ----------------------------------------------------------------------------------------
    def _fisher_generator(self, name: str, device: torch.device) -> torch.Generator:
        gen = self._fisher_generators.get(name)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._fisher_seeds[0] if name == "sample" else self._fisher_seeds[1])
            if self._fisher_pending_state is not None and name in self._fisher_pending_state:
                gen.set_state(self._fisher_pending_state.pop(name))
            self._fisher_generators[name] = gen
        return gen

    def _step_share(self, value, num_items_in_batch):
        # With num_items_in_batch, each micro-batch's loss is already a share of the step's mean; without, the
        # Trainer divides each micro-batch's mean by the accumulation steps. Values stay tensors (no host sync
        # in the step); they are read at logging time.
        return value if num_items_in_batch is not None else value / self.args.gradient_accumulation_steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.fisher_config
        coef = 0.0
        if cfg is not None and model.training:
            coef = cfg.coefficient(self.state.global_step)
            if coef > 0 and cfg.probability < 1:
                gate = self._fisher_generator("gate", torch.device("cpu"))
                coef = coef / cfg.probability if torch.rand((), generator=gate) < cfg.probability else 0.0
        if coef == 0.0:  # exactly TRL's step: no capture, no kernel switch
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if cfg is not None and model.training:
                loss = out[0] if return_outputs else out
                self._fisher_logs["ce_loss"] += self._step_share(loss.detach(), num_items_in_batch)
            self._maybe_fisher_diagnostic(model, inputs)
            return out

        input_ids = inputs["input_ids"]
        labels = inputs.get("labels")
        shared = not return_outputs and self._fisher_can_share_head(model)
        if shared:
            # One forward, one LM-head product: the backbone's hidden states (captured) give the logits of the
            # predicted positions, which feed both the cross-entropy and the penalty. ``logits_to_keep=1`` keeps
            # the model's own head to a single position; the call still goes through every wrapper (DDP, PEFT).
            forward = {k: v for k, v in inputs.items() if k != "labels"}
            with capture_forward(model) as cap:
                model(**forward, use_cache=False, logits_to_keep=1)
        else:  # TRL computes the loss (its fused head); the penalty computes its own logits
            with capture_forward(model) as cap:
                out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if cap.embeds is None or cap.hidden is None:
            raise RuntimeError(
                "The Fisher penalty saw no input-embedding / backbone forward in this step (was the model called "
                "with inputs_embeds?); it needs input_ids."
            )
        predicted = predicted_positions(
            tuple(input_ids.shape),
            labels=labels,
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
            device=cap.embeds.device,
        )
        normalizer = predicted.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        scale = 1.0
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            scale = float(self.accelerator.num_processes)  # as TRL scales the loss: DDP averages gradients
        base = unwrap_model(model)
        logits = logits_from_hidden(base, cap.hidden[predicted])  # (N, V)
        targets = next_token_targets(input_ids, predicted, labels) if shared else None  # (N,)
        result = fisher_penalty_from_logits(
            cap.embeds,
            logits,
            token_mask=inputs.get("attention_mask"),
            kind=cfg.kind,
            num_samples=cfg.num_samples,
            sampling=cfg.sampling,
            generator=self._fisher_generator("sample", cap.embeds.device),
            normalizer=normalizer,
            targets=targets,
        )
        if shared:  # the cross-entropy from the same log-softmax, normalized as TRL's loss
            penalty, nll_sum = result
            loss = nll_sum / normalizer * scale
            self._fisher_trl_metrics(logits.detach(), targets, inputs)
        else:
            penalty = result
            loss = out[0] if return_outputs else out
        total = loss + (coef * scale) * penalty.to(loss.dtype)
        logs = self._fisher_logs
        logs["ce_loss"] += self._step_share(loss.detach(), num_items_in_batch)
        logs["penalty"] += self._step_share(penalty.detach() * scale, num_items_in_batch)
        logs["applied"] += self._step_share(1.0, num_items_in_batch)
        return (total, out[1]) if return_outputs else total

    def _fisher_can_share_head(self, model) -> bool:
        """Our cross-entropy replaces TRL's only for TRL's plain token-mean NLL on a model taking logits_to_keep.
        Decided once per trainer (the settings and the model class do not change during training)."""
        if self._fisher_share_head is None:
            self._fisher_share_head = self._fisher_head_is_shareable(model)
        return self._fisher_share_head

    def _fisher_head_is_shareable(self, model) -> bool:
        if (
            self.compute_loss_func is not None
            or self.label_smoother is not None
            or getattr(self.args, "loss_type", "nll") != "nll"
            or getattr(self, "aux_loss_enabled", False)
        ):
            return False
        try:
            params = inspect.signature(unwrap_model(model).forward).parameters
        except (TypeError, ValueError):
            return False
        return "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def _fisher_trl_metrics(self, logits: torch.Tensor, targets: torch.Tensor, inputs) -> None:
        """The per-step metrics TRL logs (entropy, token accuracy, token count), from our logits."""
        metrics = getattr(self, "_metrics", None)
        if metrics is None:
            return
        with torch.no_grad():
            logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
            n = self.accelerator.gather_for_metrics(torch.tensor(len(targets), device=logits.device)).sum()
            ent = self.accelerator.gather_for_metrics(-(logp.exp() * logp).sum()).sum()
            correct = self.accelerator.gather_for_metrics((logits.argmax(-1) == targets).sum()).sum()
        metrics["train"]["entropy"].append((ent / n).item() if n > 0 else 0.0)
        metrics["train"]["mean_token_accuracy"].append((correct / n).item() if n > 0 else 0.0)
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        else:
            local = torch.tensor(inputs["input_ids"].size(1), device=logits.device)
        self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // getattr(
            self, "_tp_size", 1
        )
        metrics["train"]["num_tokens"] = [self._total_train_tokens]

    def _maybe_fisher_diagnostic(self, model, inputs) -> None:
        every = self.fisher_diagnostic_steps
        step = self.state.global_step
        if every is None or not model.training or step % every or self._fisher_diag_step == step:
            return
        self._fisher_diag_step = step  # once per optimizer step (first micro-batch)
        model.eval()  # noise-free: no dropout, and NEFTune adds noise only in training mode
        try:
            value = fisher_penalty(
                model,
                input_ids=inputs["input_ids"],
                attention_mask=inputs.get("attention_mask"),
                labels=inputs.get("labels"),
                position_ids=inputs.get("position_ids"),
                generator=self._fisher_generator("sample", inputs["input_ids"].device),
                create_graph=False,
            )
        finally:
            model.train()
        self._fisher_diag.append(value.item())

    def _fisher_log_entries(self) -> dict[str, float]:
        entries: dict[str, float] = {}
        logs = self._fisher_logs
        steps = self.state.global_step - logs["steps"]
        if self.fisher_config is not None and steps > 0:
            entries["fisher/ce_loss"] = float(logs["ce_loss"]) / steps
            applied = logs["applied"]
            entries["fisher/applied_fraction"] = applied / steps
            entries["fisher/coef"] = self.fisher_config.coefficient(max(self.state.global_step - 1, 0))
            if applied > 0:
                # R averaged over the steps that computed it (with probability < 1 it is unscaled here)
                entries["fisher/penalty"] = float(logs["penalty"]) / applied
        if self._fisher_diag:
            entries["fisher/trace_estimate"] = sum(self._fisher_diag) / len(self._fisher_diag)
            self._fisher_diag = []
        self._fisher_logs = {"ce_loss": 0.0, "penalty": 0.0, "applied": 0.0}
        self._fisher_logs["steps"] = float(self.state.global_step)
        return entries

    # -- checkpoints: the noise stream travels with the RNG states -----------------------------------------
    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.neftune_hook is not None:
            path = os.path.join(output_dir, NEFTUNE_STATE_FILE.format(rank=self.args.process_index))
            torch.save(self.neftune_hook.state_dict(), path)
        if self._fisher_generators:
            path = os.path.join(output_dir, FISHER_STATE_FILE.format(rank=self.args.process_index))
            torch.save({k: g.get_state() for k, g in self._fisher_generators.items()}, path)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is not None and (self.fisher_config is not None or self.fisher_diagnostic_steps):
            path = os.path.join(checkpoint, FISHER_STATE_FILE.format(rank=self.args.process_index))
            if os.path.isfile(path):
                self._fisher_pending_state = torch.load(path, weights_only=True)
                self._fisher_generators = {}
        if self.neftune_hook is None or checkpoint is None:
            return
        path = os.path.join(checkpoint, NEFTUNE_STATE_FILE.format(rank=self.args.process_index))
        if not os.path.isfile(path):
            logger.warning(
                "%s has no NEFTune state (%s): the noise stream restarts from its seed", checkpoint, path
            )
            return
        self.neftune_hook.load_state_dict(torch.load(path, weights_only=True))

    # -- logging -----------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            if self.neftune_hook is not None:
                logs["neftune/alpha"] = self.neftune_config.alpha
                for key, value in self.neftune_hook.pop_stats().items():
                    logs[f"neftune/{key}"] = value
            if self.noisytune_config is not None:
                logs["noisytune/lambda"] = self.noisytune_config.lam
            logs.update(self._fisher_log_entries())
        super().log(logs, start_time)
