"""Fault injection: kill -9 a tiny `noisyft train` run at random points (during a step, while a checkpoint
is being saved, while the final model is being saved), resume it, and compare the final weights with an
uninterrupted run: they must be exactly equal. A killed run must never leave a `model/` folder without
whole weights.

One chain of kills keeps this under a minute: run, kill, resume, kill the resumed run, ... The kill points
come from fixed seeds; where each one landed is printed (``pytest -s``) and asserted where it matters.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import noisyft
from noisyft.checkpoints import checkpoint_problem, last_complete_checkpoint, weights_problem

from conftest import tiny_llama, tiny_tokenizer

# TODO(lead): once recipe.py maps `--resume-from-checkpoint last` through noisyft.checkpoints.resolve_resume,
# set this to True: the chain then resumes with "last" (as a user would) instead of the folder that
# last_complete_checkpoint picks here. With transformers' own choice, "last" picks a partial checkpoint.
RESUME_WITH_LAST = True

SEEDS = (11, 12, 13)  # one per kill point, in the order of KILLS
KILLS = ("step", "checkpoint save", "final save")
STEPS, SAVE_STEPS = 8, 2


@pytest.fixture
def inputs(tmp_path):
    model_dir = tmp_path / "tinymodel"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    with data.open("w") as f:
        for i in range(24):
            record = {"instruction": f"write hello w{i}", "input": "", "output": "hello world w1 w2"}
            f.write(json.dumps(record) + "\n")
    return model_dir, data


def start(model_dir: Path, data: Path, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    src = str(Path(noisyft.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, "-m", "noisyft.cli", "train", "--model", str(model_dir), "--data", str(data)]
    argv += ["--max-steps", str(STEPS), "--save-steps", str(SAVE_STEPS), "--output-dir", str(out)]
    argv += ["--method", "neftune", "--per-device-train-batch-size", "4", "--eval-data", "none", *extra]
    with log.open("a") as f:
        return subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT)


def checkpoint_dirs(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    return (
        sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if folder.is_dir()
        else []
    )


def poll(proc: subprocess.Popen, hit, timeout: float = 60.0) -> bool:
    """Poll `hit()` about every millisecond until it is true (True) or the process exits (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if hit():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    raise AssertionError("the training run neither reached the kill point nor finished")


def kill_at(kind: str, proc: subprocess.Popen, out: Path, rng: random.Random) -> bool:
    """Kill -9 `proc` at a point of `kind`; False when the run finished before it got there."""
    done = {p.name for p in checkpoint_dirs(out) if (p / "trainer_state.json").is_file()}
    if kind == "checkpoint save":  # a new checkpoint folder whose trainer_state.json is not written yet
        hit = poll(
            proc,
            lambda: any(
                p.name not in done and not (p / "trainer_state.json").exists() for p in checkpoint_dirs(out)
            ),
        )
        time.sleep(rng.uniform(0, 0.004))  # somewhere inside the save
    elif kind == "step":  # a random moment after the next checkpoint completed: in the steps that follow
        hit = poll(
            proc,
            lambda: any(
                p.name not in done and (p / "trainer_state.json").exists() for p in checkpoint_dirs(out)
            ),
        )
        time.sleep(rng.uniform(0.005, 0.03))  # a step of this tiny run takes a few tens of ms
    else:  # the final model's temporary folder exists: the final save is under way
        hit = poll(proc, lambda: any(out.glob(".model.tmp-*")))
        time.sleep(rng.uniform(0, 0.004))
    if not hit or proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def landed(out: Path) -> str:
    parts = []
    for p in checkpoint_dirs(out):
        problem = checkpoint_problem(p)
        parts.append(p.name + ("" if problem is None else f" (partial: {problem})"))
    if any(out.glob(".model.tmp-*")):
        parts.append(".model.tmp-* (final save cut)")
    elif all("partial" not in part for part in parts):
        parts.append("no save under way: killed during a step")
    return "; ".join(parts)


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_gives_the_same_weights(inputs, tmp_path, capsys):
    model_dir, data = inputs
    reference_out, out = tmp_path / "reference", tmp_path / "killed"
    reference = start(model_dir, data, reference_out, tmp_path / "reference.log")  # runs beside the chain

    proc = start(model_dir, data, out, tmp_path / "killed.log")
    report = []
    for kind, seed in zip(KILLS, SEEDS, strict=True):
        if not kill_at(kind, proc, out, random.Random(seed)):
            report.append((kind, seed, "missed: the run finished first"))
            break
        report.append((kind, seed, landed(out)))
        if kind == "checkpoint save":  # the case: a partial checkpoint above a complete one
            partial = [p for p in checkpoint_dirs(out) if checkpoint_problem(p)]
            assert partial and last_complete_checkpoint(out) is not None, report
        # a killed run never leaves a model/ folder without whole weights (nor metrics of a finished run)
        assert not (out / "model").exists() or weights_problem(out / "model") is None
        assert not (out / "metrics.json").exists()
        resume_from = last_complete_checkpoint(out)
        if resume_from is None:  # killed before the first checkpoint was complete: start again
            proc = start(model_dir, data, out, tmp_path / "killed.log", "--overwrite-output-dir")
        else:
            # wiring needed (see RESUME_WITH_LAST): "last" must mean last_complete_checkpoint(out)
            value = "last" if RESUME_WITH_LAST else resume_from
            proc = start(model_dir, data, out, tmp_path / "killed.log", "--resume-from-checkpoint", value)
    assert proc.wait(timeout=120) == 0, (tmp_path / "killed.log").read_text()[-3000:]
    assert reference.wait(timeout=120) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    with capsys.disabled():
        print("\nkill points (kind, seed, what the folder held after the kill):")
        for row in report:
            print("  ", *row)
    survived = [r for r in report if not r[2].startswith("missed")]
    assert len(survived) >= 2, report  # at least the checkpoint-save and the step kill landed
    assert any("partial" in r[2] for r in report if r[0] == "checkpoint save"), report

    expected = load_file(reference_out / "model" / "model.safetensors")
    resumed = load_file(out / "model" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name
