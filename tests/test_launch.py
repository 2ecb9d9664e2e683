"""`noisyft train` under torchrun: one data-parallel run (gloo on CPU), one run folder written by rank 0, one
summary line, and the weights of the equivalent single-process run (2 ranks x batch 2 = 1 process x batch 4)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.slow


def _torchrun() -> str | None:
    path = Path(sys.executable).with_name("torchrun")
    return str(path) if path.exists() else shutil.which("torchrun")


def _args(model_dir, data, out, batch):
    return [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--max-steps",
        "3",
        "--save-steps",
        "2",
        "--eval-data",
        "none",
        "--per-device-train-batch-size",
        str(batch),
        "--method",
        "none",
        "--bf16",
        "false",
        "--learning-rate",
        "1e-3",
        "--lr-scheduler-type",
        "constant",
        "--warmup-steps",
        "0",
    ]


@pytest.mark.skipif(_torchrun() is None, reason="torchrun not installed")
def test_torchrun_of_the_command_is_one_ddp_run(tmp_path):
    from safetensors.torch import load_file

    model_dir, data = tmp_path / "m", tmp_path / "data.jsonl"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data.write_text(
        "".join(
            json.dumps({"instruction": f"write hello w{i}", "input": "", "output": "hello world w1 w2"})
            + "\n"
            for i in range(16)
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            _torchrun(),
            "--nproc_per_node",
            "2",
            "-m",
            "noisyft.cli",
            *_args(model_dir, data, tmp_path / "ddp", 2),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("Run folder:") == 1  # one summary, from rank 0
    run = tmp_path / "ddp"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    ckpt = run / "checkpoints" / "checkpoint-2"
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()

    one = subprocess.run(
        [sys.executable, "-m", "noisyft.cli", *_args(model_dir, data, tmp_path / "single", 4)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(run / "model" / "model.safetensors")
    b = load_file(tmp_path / "single" / "model" / "model.safetensors")
    init = load_file(model_dir / "model.safetensors")
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it trained
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
