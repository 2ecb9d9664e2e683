"""Which trainer checkpoint to resume from: ``last`` means the last COMPLETE one.

transformers' ``Trainer._save_checkpoint`` writes ``<run>/checkpoints/checkpoint-<step>/`` in this order: the
model (``model.safetensors``, or shards with ``model.safetensors.index.json``, or ``adapter_model.safetensors``
for PEFT; plus config, tokenizer, ``training_args.bin``), then ``optimizer.pt``, ``scheduler.pt``,
``scaler.pt`` (mixed precision only) and ``rng_state*.pth`` (noisyft adds its noise-stream state there),
and ``trainer_state.json`` LAST; then it may delete older checkpoints (``save_total_limit``). None of these
writes is atomic, so a kill leaves a folder with any prefix of that list, possibly a torn last file, and a
kill during the rotation leaves an old folder half deleted.

A checkpoint is complete when

* ``trainer_state.json`` parses as a JSON object whose ``global_step`` is the folder's step (it is the last
  file written, so its presence means the writes before it returned);
* the weights load: every safetensors file named (directly or by the shard index) has a parseable header
  and exactly the size the header's offsets imply;
* every pickle-zip file (``*.pt``, ``*.pth``, ``*.bin``; ``torch.save`` writes zip archives) has its zip
  directory, which sits at the end of the file, so a truncated one fails;
* ``optimizer.pt``, ``scheduler.pt`` and an ``rng_state*.pth`` are all present when any of them is
  (``save_only_model`` writes none of the three).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "checkpoint_problem",
    "is_complete_checkpoint",
    "last_complete_checkpoint",
    "resolve_resume",
    "weights_problem",
]

CHECKPOINTS_SUBDIR = "checkpoints"
_STEP = re.compile(r"^checkpoint-(\d+)$")
_MAX_HEADER = 100 * 2**20  # safetensors caps its JSON header at 100 MB


class CheckpointError(ValueError):
    """No usable checkpoint to resume from (one line, naming the folder)."""


def _safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file, or None: 8-byte header length, JSON header, data size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                return f"{path.name} is truncated (header of {n} bytes in a {size}-byte file)"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, ValueError) as exc:
        return f"{path.name} has an unreadable header ({exc})"
    if not isinstance(header, dict):
        return f"{path.name} has an unreadable header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        state = "is truncated" if size < expected else "has extra data"
        return f"{path.name} {state} ({size} bytes, its header describes {expected})"
    return None


def weights_problem(folder: str | os.PathLike) -> str | None:
    """Why the model weights in `folder` do not load (safetensors: header and size; sharded via the index;
    PEFT adapters), naming the file, or None."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"{index.name} is unreadable ({exc})"
        names = shards
    else:
        names = [n for n in ("model.safetensors", "adapter_model.safetensors") if (folder / n).is_file()]
        if not names:
            return "no model weights (model.safetensors, a shard index or adapter_model.safetensors)"
    for name in names:
        problem = _safetensors_problem(folder / name)
        if problem:
            return problem
    return None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the checkpoint folder `path` is not complete (see the module docstring), or None when it is."""
    folder = Path(path)
    if not folder.is_dir():
        return "not a folder" if folder.exists() else "does not exist"
    state_file = folder / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no trainer_state.json (the trainer writes it last: the save did not finish)"
    except (OSError, ValueError) as exc:
        return f"trainer_state.json is unreadable ({exc})"
    step = _STEP.match(folder.name)
    if not isinstance(state, dict):
        return "trainer_state.json is not a JSON object"
    if step and state.get("global_step") != int(step.group(1)):
        return f"trainer_state.json says global_step {state.get('global_step')!r}, the folder {folder.name}"
    problem = weights_problem(folder)
    if problem:
        return problem
    for pickled in sorted([*folder.glob("*.pt"), *folder.glob("*.pth"), *folder.glob("*.bin")]):
        try:
            zipfile.ZipFile(pickled).close()
        except (OSError, zipfile.BadZipFile):
            return f"{pickled.name} is truncated or not a torch.save archive"
    resume_state = {
        "optimizer.pt": (folder / "optimizer.pt").is_file(),
        "scheduler.pt": (folder / "scheduler.pt").is_file(),
        "rng_state*.pth": any(folder.glob("rng_state*.pth")),
    }
    if any(resume_state.values()) and not all(resume_state.values()):
        missing = ", ".join(name for name, present in resume_state.items() if not present)
        return f"{missing} missing beside the other resume files"
    return None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a complete trainer checkpoint folder (see :func:`checkpoint_problem`)."""
    return checkpoint_problem(path) is None


def _step_folders(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The ``checkpoint-<step>`` folder with the highest step that is complete, under
    ``<output_dir>/checkpoints`` (or directly under `output_dir` when it has no ``checkpoints/``), or None.
    Incomplete ones with a higher step are skipped with a warning naming them and what is wrong."""
    root = Path(output_dir)
    folder = root / CHECKPOINTS_SUBDIR if (root / CHECKPOINTS_SUBDIR).is_dir() else root
    for _, path in _step_folders(folder):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("skipping the incomplete checkpoint %s: %s", path, problem)
    return None


def resolve_resume(output_dir: str | os.PathLike, value: str | os.PathLike | None) -> str | None:
    """The checkpoint folder to resume from, for ``--resume-from-checkpoint VALUE`` in run folder `output_dir`.

    None stays None (a fresh run); ``"last"`` is :func:`last_complete_checkpoint` (raises when there is
    none); any other value is a checkpoint folder that must be complete. Raises :class:`CheckpointError`
    (a ValueError) with a one-line message naming the folder.
    """
    if value is None:
        return None
    if os.fspath(value) == "last":
        found = last_complete_checkpoint(output_dir)
        if found is None:
            where = Path(output_dir) / CHECKPOINTS_SUBDIR
            raise CheckpointError(
                f"no complete checkpoint in {where}; start without --resume-from-checkpoint"
            )
        return found
    problem = checkpoint_problem(value)
    if problem is not None:
        raise CheckpointError(f"cannot resume from checkpoint {os.fspath(value)}: {problem}")
    return os.fspath(value)
