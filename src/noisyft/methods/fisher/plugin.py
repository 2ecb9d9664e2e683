"""The Fisher penalty as a loss term, and the Fisher-trace diagnostic, attached to a Trainer's training step.

One forward and one LM-head product per step: the model runs once through all its wrappers with
``logits_to_keep=1``; the backbone's hidden states at the predicted positions give one logits tensor whose single
log-softmax feeds the cross-entropy, the y' sampler and the penalty. When the trainer's loss is not the plain
token-mean NLL (a custom loss, label smoothing, another ``loss_type``, an MoE aux loss), the trainer computes its
loss as usual and the penalty computes its own logits.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from noisyft._torch import rank_seed, unwrap_model
from noisyft.methods.base import MethodPlugin
from noisyft.trl_compat import keeps_sft_metrics, record_sft_metrics

from .penalty import (
    capture_forward,
    fisher_penalty,
    fisher_penalty_from_hidden,
    next_token_targets,
    predicted_positions,
)


class FisherPlugin(MethodPlugin):
    """``loss + coef(step) * R``, R normalized like the loss (same token count under gradient accumulation).

    Logs ``fisher/ce_loss`` (the loss without the penalty), ``fisher/penalty`` (R), ``fisher/coef`` (effective
    coefficient) and ``fisher/applied_fraction``; the trainer's ``loss`` is the total."""

    name = "fisher"

    def __init__(self, config, *, seed: int, rank: int):
        super().__init__(config, seed=seed, rank=rank)
        base = config.seed if config.seed is not None else seed
        # y' sampling: one stream per rank. Gate (``probability``): one stream shared by all ranks.
        self._seeds = {"sample": rank_seed(base, rank) ^ 0x5F15, "gate": base}
        self._generators: dict[str, torch.Generator] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._logs = {"ce_loss": 0.0, "penalty": 0.0, "applied": 0.0}
        self._logged_at_step = 0
        self._share_head: bool | None = None

    def generator(self, name: str, device: torch.device) -> torch.Generator:
        gen = self._generators.get(name)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(self._seeds[name])
            if name in self._pending:
                gen.set_state(self._pending.pop(name))
            self._generators[name] = gen
        return gen

    def _coefficient(self, trainer) -> float:
        cfg = self.config
        coef = cfg.coefficient(trainer.state.global_step)
        if coef > 0 and cfg.probability < 1:
            gate = self.generator("gate", torch.device("cpu"))
            coef = coef / cfg.probability if torch.rand((), generator=gate) < cfg.probability else 0.0
        return coef

    def _share(self, trainer, value, num_items_in_batch):
        # With num_items_in_batch each micro-batch's loss is already a share of the step's mean; without, the
        # Trainer divides each micro-batch's mean by the accumulation steps. Tensors stay on device (no host sync).
        return value if num_items_in_batch is not None else value / trainer.args.gradient_accumulation_steps

    def compute_loss(self, trainer, model, inputs, *, return_outputs, num_items_in_batch, default: Callable):
        coef = self._coefficient(trainer)
        if coef == 0.0:  # exactly the trainer's step: no capture, no kernel switch
            out = default()
            loss = out[0] if return_outputs else out
            self._logs["ce_loss"] += self._share(trainer, loss.detach(), num_items_in_batch)
            return out
        shared = not return_outputs and self._can_share_head(trainer, model)
        if shared:
            # ``logits_to_keep=1`` keeps the model's own head to one position; the call goes through every wrapper
            forward = {k: v for k, v in inputs.items() if k != "labels"}
            with capture_forward(model) as cap:
                model(**forward, use_cache=False, logits_to_keep=1)
        else:
            with capture_forward(model) as cap:
                out = default()
        if cap.embeds is None or cap.hidden is None:
            raise RuntimeError(
                "The Fisher penalty saw no input-embedding / backbone forward in this step (was the model called "
                "with inputs_embeds?); it needs input_ids."
            )
        input_ids, labels = inputs["input_ids"], inputs.get("labels")
        predicted = predicted_positions(
            tuple(input_ids.shape),
            labels=labels,
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
            device=cap.embeds.device,
        )  # (B, L) bool
        normalizer = predicted.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        scale = 1.0
        if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
            scale = float(trainer.accelerator.num_processes)  # as TRL scales the loss: DDP averages gradients
        targets = next_token_targets(input_ids, predicted, labels) if shared else None  # (N,)
        result = fisher_penalty_from_hidden(
            unwrap_model(model),
            cap.embeds,
            cap.hidden[predicted],  # (N, D)
            token_mask=inputs.get("attention_mask"),
            kind=self.config.kind,
            num_samples=self.config.num_samples,
            sampling=self.config.sampling,
            generator=self.generator("sample", cap.embeds.device),
            normalizer=normalizer,
            targets=targets,
            stats=shared and keeps_sft_metrics(trainer),
        )
        if shared:  # the cross-entropy from the same log-softmax, normalized as TRL's loss
            penalty, nll_sum, stats = result
            loss = nll_sum / normalizer * scale
            record_sft_metrics(trainer, None, targets, inputs, stats=stats)
        else:
            penalty = result
            loss = out[0] if return_outputs else out
        total = loss + (coef * scale) * penalty.to(loss.dtype)
        self._logs["ce_loss"] += self._share(trainer, loss.detach(), num_items_in_batch)
        self._logs["penalty"] += self._share(trainer, penalty.detach() * scale, num_items_in_batch)
        self._logs["applied"] += self._share(trainer, 1.0, num_items_in_batch)
        return (total, out[1]) if return_outputs else total

    def _can_share_head(self, trainer, model) -> bool:
        """Our cross-entropy replaces the trainer's only for a plain token-mean NLL on a model taking
        ``logits_to_keep``. Decided once (the settings and the model class do not change during training)."""
        if self._share_head is None:
            self._share_head = _plain_nll(trainer) and _takes_logits_to_keep(model)
        return self._share_head

    def log_entries(self, trainer) -> dict[str, float]:
        step = trainer.state.global_step
        steps = step - self._logged_at_step
        entries: dict[str, float] = {}
        if steps > 0:
            logs = self._logs
            entries["fisher/ce_loss"] = float(logs["ce_loss"]) / steps
            entries["fisher/applied_fraction"] = float(logs["applied"]) / steps
            entries["fisher/coef"] = self.config.coefficient(max(step - 1, 0))
            if logs["applied"] > 0:  # R averaged over the steps that computed it (unscaled by 1/probability)
                entries["fisher/penalty"] = float(logs["penalty"]) / float(logs["applied"])
        self._logs = {"ce_loss": 0.0, "penalty": 0.0, "applied": 0.0}
        self._logged_at_step = step
        return entries

    def state_dict(self) -> dict[str, Any] | None:
        return {k: g.get_state() for k, g in self._generators.items()} or None

    def load_state_dict(self, state, *, checkpoint: str) -> None:
        if state is not None:
            self._pending = dict(state)
            self._generators = {}


def _plain_nll(trainer) -> bool:
    return not (
        getattr(trainer, "compute_loss_func", None) is not None
        or getattr(trainer, "label_smoother", None) is not None
        or getattr(trainer.args, "loss_type", "nll") != "nll"
        or getattr(trainer, "aux_loss_enabled", False)
    )


def _takes_logits_to_keep(model) -> bool:
    try:
        params = inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return False
    return "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class FisherDiagnosticPlugin(MethodPlugin):
    """Every ``steps`` optimizer steps, log ``fisher/trace_estimate``: a token-F estimate of Tr(F_X) on the
    current batch, noise-free (model in eval mode) and without parameter gradients, in any run. It draws from its
    own stream, so training is unchanged."""

    name = "fisher_diagnostic"

    def __init__(self, steps: int, *, seed: int, rank: int):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"fisher_diagnostic_steps must be an integer >= 1, got {steps!r}")
        super().__init__(None, seed=seed, rank=rank)
        self.steps = steps
        self._seed = rank_seed(seed, rank, stream="fisher-diagnostic")
        self._generator: torch.Generator | None = None
        self._pending: torch.Tensor | None = None
        self._values: list[float] = []
        self._last_step = -1

    def on_batch(self, trainer, model, inputs) -> None:
        step = trainer.state.global_step
        if step % self.steps or self._last_step == step:
            return
        self._last_step = step  # once per optimizer step (its first micro-batch)
        device = inputs["input_ids"].device
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self._seed)
            if self._pending is not None:
                self._generator.set_state(self._pending)
                self._pending = None
        model.eval()  # noise-free: no dropout, and NEFTune adds noise only in training mode
        try:
            value = fisher_penalty(
                model,
                input_ids=inputs["input_ids"],
                attention_mask=inputs.get("attention_mask"),
                labels=inputs.get("labels"),
                position_ids=inputs.get("position_ids"),
                generator=self._generator,
                create_graph=False,
            )
        finally:
            model.train()
        self._values.append(value.item())

    def log_entries(self, trainer) -> dict[str, float]:
        if not self._values:
            return {}
        value = sum(self._values) / len(self._values)
        self._values = []
        return {"fisher/trace_estimate": value}

    def state_dict(self) -> dict[str, Any] | None:
        return None if self._generator is None else {"generator": self._generator.get_state()}

    def load_state_dict(self, state, *, checkpoint: str) -> None:
        if state is not None:
            self._pending = state["generator"]
            self._generator = None

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps}
