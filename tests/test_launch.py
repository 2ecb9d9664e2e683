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


def _inputs(tmp_path, n: int):
    """A tiny model folder and n Alpaca records."""
    model_dir, data = tmp_path / "m", tmp_path / "data.jsonl"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    rows = (
        {"instruction": f"write hello w{i}", "input": "", "output": "hello world w1 w2"} for i in range(n)
    )
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


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

    model_dir, data = _inputs(tmp_path, 16)
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


def test_fsdp_on_cpu_is_refused(tmp_path, capsys):
    """accelerate (1.15) enables FSDP only for multi-accelerator runs: on CPU, `--sft-arg fsdp=...` under torchrun
    trained as plain DDP (model wrapped in DistributedDataParallel, same losses to the bit). The command refuses it
    rather than report an FSDP run that was not one."""
    from noisyft.cli import main

    model_dir, data = _inputs(tmp_path, 4)
    fsdp = ["--sft-arg", "fsdp=full_shard", "--sft-arg", "fsdp_config={fsdp_version: 2}"]
    assert main([*_args(model_dir, data, tmp_path / "fsdp", 2), *fsdp]) != 0
    err = capsys.readouterr().err
    assert "fsdp" in err and "GPUs only" in err and "Traceback" not in err


def _losses(run: Path) -> list[float]:
    history = json.loads((run / "metrics.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


@pytest.mark.skipif(_torchrun() is None, reason="torchrun not installed")
def test_ddp_command_noise_streams_and_resume(tmp_path):
    """`noisyft train --method noisytune+neftune` under torchrun (2 ranks): each rank saves its own NEFTune stream,
    and a run killed after its step-2 checkpoint and resumed (`--resume-from-checkpoint last`) logs the losses of
    the uninterrupted run at steps 3-5 (1e-5): weights, optimizer, data order and both noise streams continue."""
    model_dir, data = _inputs(tmp_path, 24)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(out, *extra):
        argv = _args(model_dir, data, out, 2)
        argv[argv.index("--max-steps") + 1] = "5"
        argv[argv.index("--method") + 1] = "noisytune+neftune"
        argv += ["--logging-steps", "1", *extra]
        proc = subprocess.run(
            [_torchrun(), "--nproc_per_node", "2", "-m", "noisyft.cli", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return _losses(out)

    straight = launch(tmp_path / "straight")
    assert len(straight) == 5
    ckpt = tmp_path / "straight" / "checkpoints" / "checkpoint-2"
    states = [torch.load(ckpt / f"noisyft_neftune_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert states[0]["seed"] != states[1]["seed"]  # each rank draws its own noise

    # what a kill after the step-2 checkpoint leaves: no later checkpoint, no model, no metrics
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "straight", killed)
    for later in (killed / "checkpoints").glob("checkpoint-*"):
        if later.name != "checkpoint-2":
            shutil.rmtree(later)
    shutil.rmtree(killed / "model")
    (killed / "metrics.json").unlink()
    resumed = launch(killed, "--resume-from-checkpoint", "last")
    assert len(resumed) == 5 and resumed[2:] == pytest.approx(straight[2:], abs=1e-5)


@pytest.mark.skipif(_torchrun() is None, reason="torchrun not installed")
def test_deepspeed_zero2_and_zero3_on_cpu_match_ddp(tmp_path):
    """DeepSpeed ZeRO-2 and ZeRO-3 through transformers' integration (`pip install noisyft[deepspeed]`), two CPU
    processes with NEFTune: the same losses as DDP, each rank its own noise stream, and ZeRO-3's gathered final
    weights equal DDP's. Skipped where deepspeed is not installed."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    model_dir, data = _inputs(tmp_path, 16)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    losses = {}
    for name, stage in (("ddp", None), ("zero2", 2), ("zero3", 3)):
        extra = []
        if stage is not None:
            config = tmp_path / f"{name}.json"
            zero = {"stage": stage}
            auto = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
            config.write_text(
                json.dumps(
                    {"zero_optimization": zero, "gradient_clipping": "auto"} | dict.fromkeys(auto, "auto")
                )
            )
            extra = ["--sft-arg", f"deepspeed={config}"]
        argv = _args(model_dir, data, tmp_path / name, 2)
        argv[argv.index("--method") + 1] = "neftune"
        proc = subprocess.run(
            [
                _torchrun(),
                "--nproc_per_node",
                "2",
                "-m",
                "noisyft.cli",
                *argv,
                "--logging-steps",
                "1",
                *extra,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[name] = _losses(tmp_path / name)
        ckpt = tmp_path / name / "checkpoints" / "checkpoint-2"
        seeds = [torch.load(ckpt / f"noisyft_neftune_rank{r}.pt", weights_only=True)["seed"] for r in (0, 1)]
        assert seeds[0] != seeds[1], name
    assert len(losses["ddp"]) == 3
    assert losses["zero2"] == pytest.approx(losses["ddp"], abs=1e-4)
    assert losses["zero3"] == pytest.approx(losses["ddp"], abs=1e-4)
    a = load_file(tmp_path / "zero3" / "model" / "model.safetensors")
    b = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
