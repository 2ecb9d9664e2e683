"""`last` is the last COMPLETE checkpoint: fake checkpoint folders, complete and broken in each way."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from noisyft.checkpoints import (
    CheckpointError,
    checkpoint_problem,
    is_complete_checkpoint,
    last_complete_checkpoint,
    resolve_resume,
)


def make_checkpoint(root, step: int, *, resume_files: bool = True):
    """A checkpoint folder as transformers' Trainer writes it (weights, optimizer, scheduler, rng, state)."""
    folder = root / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file(
        {"w": torch.arange(64, dtype=torch.float32).reshape(8, 8), "b": torch.ones(8)},
        folder / "model.safetensors",
    )
    (folder / "config.json").write_text("{}")
    if resume_files:
        torch.save({"state": {0: {"exp_avg": torch.zeros(8)}}}, folder / "optimizer.pt")
        torch.save({"last_epoch": step}, folder / "scheduler.pt")
        torch.save({"cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return folder


def truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


BREAKAGES = {
    "truncated safetensors": (lambda f: truncate(f / "model.safetensors"), "model.safetensors"),
    "safetensors cut inside its header": (
        lambda f: truncate(f / "model.safetensors", 0.02),
        "model.safetensors",
    ),
    "missing safetensors": (lambda f: (f / "model.safetensors").unlink(), "no model weights"),
    "missing trainer_state.json": (lambda f: (f / "trainer_state.json").unlink(), "no trainer_state.json"),
    "torn trainer_state.json": (
        lambda f: truncate(f / "trainer_state.json"),
        "trainer_state.json is unreadable",
    ),
    "truncated optimizer": (lambda f: truncate(f / "optimizer.pt"), "optimizer.pt is truncated"),
    "missing scheduler": (lambda f: (f / "scheduler.pt").unlink(), "scheduler.pt missing"),
    "missing rng state": (lambda f: (f / "rng_state.pth").unlink(), "rng_state*.pth missing"),
    "wrong step": (
        lambda f: (f / "trainer_state.json").write_text('{"global_step": 3}'),
        "global_step 3",
    ),
}


def test_a_complete_checkpoint_is_complete(tmp_path):
    assert is_complete_checkpoint(make_checkpoint(tmp_path, 2))
    assert is_complete_checkpoint(make_checkpoint(tmp_path, 4, resume_files=False))  # save_only_model
    # what a real save writes loads: the check agrees with safetensors itself
    from safetensors.torch import load_file

    assert load_file(tmp_path / "checkpoints" / "checkpoint-2" / "model.safetensors")["w"].shape == (8, 8)


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_each_kind_of_partial_checkpoint_is_detected(tmp_path, name):
    folder = make_checkpoint(tmp_path, 2)
    breakage, message = BREAKAGES[name]
    breakage(folder)
    assert not is_complete_checkpoint(folder)
    assert message in checkpoint_problem(folder)


def test_an_empty_folder_is_not_a_checkpoint(tmp_path):
    (tmp_path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    assert "no trainer_state.json" in checkpoint_problem(tmp_path / "checkpoints" / "checkpoint-2")
    assert last_complete_checkpoint(tmp_path) is None


def test_last_skips_partial_checkpoints_with_a_warning(tmp_path, caplog):
    make_checkpoint(tmp_path, 2)
    good = make_checkpoint(tmp_path, 4)
    truncate(make_checkpoint(tmp_path, 6) / "model.safetensors")  # killed while saving step 6
    (tmp_path / "checkpoints" / "checkpoint-8").mkdir()  # killed before anything was written
    make_checkpoint(tmp_path, 10).joinpath("trainer_state.json").unlink()  # killed before the state
    with caplog.at_level(logging.WARNING, logger="noisyft.checkpoints"):
        assert last_complete_checkpoint(tmp_path) == str(good)
        assert resolve_resume(tmp_path, "last") == str(good)
    for step in (6, 8, 10):
        assert f"checkpoint-{step}:" in caplog.text
    assert "checkpoint-4:" not in caplog.text and "checkpoint-2" not in caplog.text


def test_resolve_resume_errors_are_one_line(tmp_path):
    assert resolve_resume(tmp_path, None) is None
    with pytest.raises(
        CheckpointError, match=r"^no complete checkpoint in .*checkpoints; start without"
    ) as e:
        resolve_resume(tmp_path, "last")
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)
    partial = make_checkpoint(tmp_path, 2)
    (partial / "scheduler.pt").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint-2: scheduler\.pt missing"):
        resolve_resume(tmp_path, str(partial))
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(tmp_path, str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume(tmp_path, "last")
    assert resolve_resume(tmp_path, str(make_checkpoint(tmp_path, 4))) == str(
        tmp_path / "checkpoints" / "checkpoint-4"
    )
