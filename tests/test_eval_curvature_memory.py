"""The curvature analysis sizes itself to the memory it has: the estimate against a measured peak, the
automatic downsizing, and the refusal with the figures."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from noisyft.eval.curvature import curvature_report
from noisyft.eval.curvature_memory import (
    CurvatureMemoryError,
    available_memory_bytes,
    estimate_peak_bytes,
)

MIB = 2**20


def small_llama(vocab: int = 1024, hidden: int = 64, layers: int = 2):
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def batch(n: int, length: int, vocab: int = 1024) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# Run in a fresh process with glibc's mmap threshold low, so freed tensors go back to the kernel and the peak
# resident size (VmHWM, reset through /proc/self/clear_refs) measures what the analysis itself allocates.
MEASURE = """
import json, sys, gc, torch
sys.path.insert(0, {tests!r})
from test_eval_curvature_memory import small_llama, batch
from noisyft.eval.curvature import curvature_report
from noisyft.eval.curvature_memory import estimate_peak_bytes

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

model, b = small_llama(), batch(2, 128)
kw = dict(n_sequences=2, length=128, max_batch_rows=16, samples=8, dtype=torch.float64, copies_model=True)
estimate = estimate_peak_bytes(model, **kw)
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS:")
curvature_report(model, b, alphas=(1.0,), mc_samples=2, hutchinson_samples=8, fisher_samples=2,
                 memory_budget_bytes=10**12)
print(json.dumps({{"estimate": estimate, "measured": status("VmHWM:") - base}}))
"""


@pytest.mark.slow  # a fresh process: about 10 s, mostly imports
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_the_estimate_is_within_a_factor_of_the_measured_peak():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    script = MEASURE.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["measured"] > 100 * MIB  # the analysis really allocated (about 270 MiB when written)
    assert 0.5 < figures["measured"] / figures["estimate"] < 2.0, figures


def test_the_estimate_scales_as_the_formula_says():
    model = small_llama()
    kw = dict(max_batch_rows=16, samples=8, dtype=torch.float64, copies_model=False)
    one = estimate_peak_bytes(model, n_sequences=1, length=100, **kw)
    # rows = min(16 // B, samples) * B: one sequence -> 8 rows, two -> 16 rows
    assert estimate_peak_bytes(model, n_sequences=2, length=100, **kw) == 2 * one
    # float32 halves it; the float64 copy of the model adds P * 8 bytes
    assert estimate_peak_bytes(model, n_sequences=1, length=100, **{**kw, "dtype": torch.float32}) == one // 2
    params = sum(p.numel() for p in model.parameters())
    assert (
        estimate_peak_bytes(model, n_sequences=1, length=100, **{**kw, "copies_model": True})
        == one + 8 * params
    )
    assert available_memory_bytes() > 0


def test_over_budget_it_sizes_itself_down_and_says_so(caplog):
    model, b = small_llama(), batch(2, 256)
    full = estimate_peak_bytes(
        model, n_sequences=2, length=256, max_batch_rows=16, samples=4, dtype=torch.float64, copies_model=True
    )
    budget = full // 12
    with caplog.at_level(logging.WARNING, logger="noisyft.eval.curvature_memory"):
        report = curvature_report(
            model,
            b,
            alphas=(1.0,),
            mc_samples=2,
            hutchinson_samples=4,
            fisher_samples=0,
            memory_budget_bytes=budget,
        )
    memory = report["memory"]
    assert memory["resized"] and memory["estimate_bytes"] <= budget < memory["asked_bytes"] == full
    assert max(report["batch"]["lengths"]) == memory["length"] < 256
    assert "curvature: the analysis needs about" in caplog.text and "cut to" in caplog.text
    assert report["table"][0]["second_order"] is not None


def test_it_refuses_with_the_figures_when_nothing_fits():
    model, b = small_llama(), batch(2, 64)
    with pytest.raises(
        CurvatureMemoryError, match=r"needs about [\d.]+ GiB even for one sequence of 16 tokens"
    ):
        curvature_report(
            model, b, mc_samples=2, hutchinson_samples=2, fisher_samples=0, memory_budget_bytes=10**6
        )
    with pytest.raises(
        CurvatureMemoryError, match=r"for 2 sequence\(s\) of 64 tokens, budget 0\.00 GiB"
    ) as info:
        curvature_report(
            model,
            b,
            mc_samples=2,
            hutchinson_samples=2,
            fisher_samples=0,
            memory_budget_bytes=10**6,
            fit_memory=False,
        )
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
