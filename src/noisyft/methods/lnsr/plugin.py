"""LNSR in a training step: the trainer's loss plus ``coef * penalty``; the clean hidden states come from the main
forward (captured from the decoder), so the penalty costs one extra decoder forward and its backward."""

from __future__ import annotations

from typing import Any

import torch

from noisyft._torch import SeededStream, rank_seed
from noisyft.methods.base import MethodPlugin

from .penalty import decoder_and_layers, lnsr_penalty


class LNSRPlugin(MethodPlugin):
    """Logs ``lnsr/penalty`` (the unweighted penalty) and ``lnsr/ce_loss`` (the loss without it)."""

    name = "lnsr"

    def __init__(self, config, *, seed: int, rank: int):
        super().__init__(config, seed=seed, rank=rank)
        self.stream = SeededStream(
            rank_seed(config.seed if config.seed is not None else seed, rank, stream="lnsr")
        )
        self._logs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_init(self, trainer) -> None:
        _, layers = decoder_and_layers(
            trainer.model
        )  # fails here, before training, on a model without layers
        n = len(layers)
        if not 0 <= self.config.layer < n:
            raise ValueError(
                f"LNSR layer {self.config.layer} is out of range: the model has {n} decoder layers"
            )
        bad = [i for i in self.config.layers or [] if not self.config.layer <= i < n]
        if bad:
            raise ValueError(
                f"LNSR layers {bad} are not in [{self.config.layer}, {n - 1}] (after the noisy layer)"
            )

    def compute_loss(self, trainer, model, inputs, *, return_outputs, num_items_in_batch, default):
        cfg = self.config
        decoder, _ = decoder_and_layers(model)
        captured: dict[str, Any] = {}

        def capture(module, args, output):
            captured.setdefault("hidden", getattr(output, "hidden_states", None))

        handle = decoder.register_forward_hook(capture)
        try:
            out = default({**inputs, "output_hidden_states": True})
        finally:
            handle.remove()
        loss = out[0] if return_outputs else out
        hidden = captured.get("hidden")
        penalty = lnsr_penalty(
            model,
            input_ids=inputs.get("input_ids"),
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
            labels=inputs.get("labels"),
            layer=cfg.layer,
            sigma=cfg.sigma,
            layers=cfg.layers,
            response_only=cfg.response_only,
            generator=self.stream(loss.device),
            clean_hidden=hidden,
            relative_sigma=cfg.relative_sigma,
            normalize=cfg.normalize,
        )
        if (
            num_items_in_batch is None
        ):  # the Trainer divides each micro-batch's loss by the accumulation steps
            share = penalty
        else:  # the loss is a share of the step's token mean: weight the penalty by this micro-batch's share
            tokens = (inputs["labels"] != -100).sum() if "labels" in inputs else penalty.new_tensor(1.0)
            share = penalty * tokens.to(penalty.dtype) / torch.as_tensor(num_items_in_batch).to(penalty)
        total = loss + cfg.coef * share.to(loss.dtype)
        self._logs.append((loss.detach(), penalty.detach()))
        return (total, out[1]) if return_outputs else total

    def log_entries(self, trainer) -> dict[str, float]:
        if not self._logs:
            return {}
        losses, penalties = zip(*self._logs, strict=True)
        self._logs = []
        return {
            "lnsr/penalty": float(torch.stack(penalties).mean()),
            "lnsr/ce_loss": float(torch.stack(losses).mean()),
        }

    def state_dict(self) -> dict[str, Any] | None:
        return self.stream.state_dict()

    def load_state_dict(self, state, *, checkpoint: str) -> None:
        if state is not None:
            self.stream.load_state_dict(state)
