"""`benchmarks/gpu_suite.py --smoke`: the GPU suite runs end to end on CPU with a tiny model, so it cannot rot
before a GPU runs it. Checks the JSON: every registered method against plain training, finite positive ratios,
tokens/s of NoisySFTTrainer and TRL's SFTTrainer."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_writes_every_method(tmp_path, monkeypatch):
    from noisyft.methods import REGISTRY

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("gpu_suite", None)
    import gpu_suite

    out = tmp_path / "suite.json"
    assert gpu_suite.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["metadata"]["device"] == "cpu"
    variants = report["methods"]["variants"]
    assert {v["method"] for v in variants.values()} == {"none", *REGISTRY}
    assert variants["plain"]["time_ratio_to_plain"] == 1.0
    for label, v in variants.items():
        for key in ("median_step_s", "time_ratio_to_plain", "peak_mem_mb", "mem_ratio_to_plain"):
            assert math.isfinite(v[key]) and v[key] > 0, (label, key, v[key])
    tps = report["tokens_per_s"]
    for name in ("trl_sft", "noisyft_sft", "trl_neftune", "noisyft_neftune"):
        assert math.isfinite(tps[name]["tokens_per_s"]) and tps[name]["tokens_per_s"] > 0, name
    assert tps["noisyft_over_trl"] == pytest.approx(
        tps["noisyft_sft"]["tokens_per_s"] / tps["trl_sft"]["tokens_per_s"], rel=1e-3
    )


def test_gpu_suite_without_cuda_says_so(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_suite
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_suite.main([])
    assert "no CUDA device" in capsys.readouterr().err
