"""The one function that writes TRL's private metric state must log what TRL itself logs.

If a TRL release renames ``_metrics`` / ``_total_train_tokens`` or changes how entropy, token accuracy or the token
count are defined, this test fails instead of the Fisher runs silently logging different numbers."""

from __future__ import annotations

import pytest
import torch

from noisyft.methods.fisher.penalty import next_token_targets, predicted_positions
from noisyft.trl_compat import record_sft_metrics

from conftest import tiny_llama, tiny_tokenizer
from test_trainer import _args, _dataset

KEYS = ("entropy", "mean_token_accuracy", "num_tokens")


def test_record_sft_metrics_matches_trl_compute_loss(tmp_path):
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=tiny_llama(),
        args=_args(tmp_path, completion_only_loss=True),
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
    )
    for name in ("_metrics", "_total_train_tokens"):
        assert hasattr(trainer, name), f"TRL no longer has SFTTrainer.{name}: update noisyft.trl_compat"
    model = trainer.model
    model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        SFTTrainer.compute_loss(trainer, model, dict(inputs))
    trl_logged = {k: list(trainer._metrics["train"][k]) for k in KEYS}
    assert all(trl_logged[k] for k in KEYS), f"TRL did not log {KEYS}: {dict(trainer._metrics['train'])}"

    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        predicted = predicted_positions(
            tuple(inputs["input_ids"].shape), labels=inputs["labels"], attention_mask=inputs["attention_mask"]
        )
        targets = next_token_targets(inputs["input_ids"], predicted, inputs["labels"])
        record_sft_metrics(trainer, logits[predicted], targets, inputs)
    ours = {k: list(trainer._metrics["train"][k]) for k in KEYS}
    for key in KEYS:
        assert ours[key] == pytest.approx(trl_logged[key], rel=1e-4, abs=1e-5), key
