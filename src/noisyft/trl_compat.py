"""The one place that writes TRL's private trainer state.

When the Fisher step computes the loss from its own logits (one LM head for the loss and the penalty), TRL's
``compute_loss`` does not run, so its per-step metrics (entropy, mean token accuracy, token count) must be filled
in the same way. They live in ``SFTTrainer._metrics``, ``_total_train_tokens`` and ``_tp_size``: private
attributes of TRL (checked against trl 1.16). ``tests/test_trl_compat.py`` runs TRL's own ``compute_loss`` and
this function on one batch and compares the entries, so a TRL release that renames or redefines them fails there
loudly instead of logging wrong numbers.
"""

from __future__ import annotations

from typing import Any

import torch

from noisyft._torch import logit_stats

_REQUIRED = ("_metrics", "_total_train_tokens")


def keeps_sft_metrics(trainer: Any) -> bool:
    """Whether ``trainer`` has TRL's metric store (``SFTTrainer`` does, a plain ``transformers.Trainer`` not)."""
    return all(hasattr(trainer, name) for name in _REQUIRED)


def record_sft_metrics(
    trainer: Any,
    logits: torch.Tensor | None,
    targets: torch.Tensor,
    inputs: dict[str, Any],
    *,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Append TRL's per-step training metrics computed from ``logits`` (N, V) at the N predicted positions and
    their ``targets`` (N,), or from ``stats`` = (entropy summed over the N positions, count of correct argmax
    predictions) computed elsewhere. Does nothing on trainers without TRL's metric store (plain
    ``transformers.Trainer``)."""
    if not keeps_sft_metrics(trainer):
        return
    metrics = trainer._metrics["train"]
    acc = trainer.accelerator
    with torch.no_grad():
        if stats is None:
            stats = logit_stats(logits, targets)
        n = acc.gather_for_metrics(torch.tensor(len(targets), device=targets.device)).sum()
        ent = acc.gather_for_metrics(stats[0].detach()).sum()
        correct = acc.gather_for_metrics(stats[1]).sum()
    metrics["entropy"].append((ent / n).item() if n > 0 else 0.0)
    metrics["mean_token_accuracy"].append((correct / n).item() if n > 0 else 0.0)
    if "attention_mask" in inputs:
        local = inputs["attention_mask"].sum()
    else:
        local = torch.tensor(inputs["input_ids"].size(1), device=targets.device)
    trainer._total_train_tokens += acc.gather_for_metrics(local).sum().item() // getattr(
        trainer, "_tp_size", 1
    )
    metrics["num_tokens"] = [trainer._total_train_tokens]
