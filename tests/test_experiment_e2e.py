"""`noisyft experiment run` end to end with the real `noisyft train` + `noisyft eval run` on a tiny model."""

from __future__ import annotations

import json

import pytest
import yaml

from noisyft.experiment.cli import main

from conftest import tiny_llama, tiny_tokenizer


def _jsonl(path, n, word):
    with path.open("w") as f:
        for i in range(n):
            f.write(
                json.dumps({"instruction": f"write {word} w{i}", "input": "", "output": f"hello world w{i}"})
                + "\n"
            )
    return path


@pytest.mark.slow
def test_two_variants_two_seeds_on_a_tiny_model(tmp_path):
    model_dir = tmp_path / "tinymodel"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = _jsonl(tmp_path / "train.jsonl", 16, "hello")
    heldout = _jsonl(tmp_path / "heldout.jsonl", 8, "world")
    spec = {
        "name": "tiny",
        "train": {"model": str(model_dir), "data": str(data), "max_steps": 2, "per_device_train_batch_size": 4,
                  "logging_steps": 1, "eval_data": "none"},
        "eval": {"analyses": ["loss"], "heldout": str(heldout), "heldout_max_examples": 8, "batch_size": 4},
        "seeds": [1, 2],
        "baseline": "plain",
        "variants": {"plain": {"method": "none"}, "neftune": {"method": "neftune", "neftune": {"alpha": 5}}},
    }  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "out"
    assert (
        main(
            ["run", str(tmp_path / "spec.yaml"), "--output-dir", str(out), "--workers", "2", "--no-progress"]
        )
        == 0
    )

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["variants"]) == ["plain", "neftune"]
    for name in ("plain", "neftune"):
        metrics = summary["variants"][name]["metrics"]
        assert metrics["loss.train"]["n"] == 2 and metrics["loss.train"]["mean"] > 0
        assert metrics[f"loss.{heldout}"]["n"] == 2
    diff = summary["variants"]["neftune"]["metrics"][f"loss.{heldout}"]["diff"]
    assert diff["pairs"] == "units" and diff["n"] == 16  # 2 seeds x 8 held-out examples
    assert diff["ci_low"] <= diff["estimate"] <= diff["ci_high"]
    run = out / "trials" / "neftune-s2" / "run"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["seed"] == 2 and config["method"] == "neftune" and config["max_steps"] == 2
    alpha = config["neftune"]["alpha"] if isinstance(config.get("neftune"), dict) else config["neftune_alpha"]
    assert alpha == 5
    assert any(
        "neftune/noise_to_embed_norm" in h
        for h in json.loads((run / "metrics.json").read_text())["log_history"]
    )
    assert "fig-curves" in (out / "report.html").read_text()
