"""One protocol for a `noisyft train` run folder: what is in it belongs to one run, and a run replaces another whole
or not at all.

* ``run.json`` records the run's identity: a random ``run_id``, the SHA-256 of its ``config.yaml``, a fingerprint
  of the training examples (token ids) and the start time. The final ``model/`` carries the same ``run_id`` and
  config hash in ``model/noisyft_run.json`` (written inside the model's temporary folder, so it arrives with the
  weights in one rename), and so does ``metrics.json``. :func:`check_run_folder` refuses a folder whose parts
  come from different runs (``noisyft eval run`` calls it).
* ``--overwrite-output-dir`` over a finished run builds the new run in a staging folder beside it and swaps it in
  only when the run has finished: a failed or killed run leaves the old one untouched (and the staging folder,
  which the next run removes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
MODEL_STAMP = "noisyft_run.json"
# what an unfinished run leaves before its model: the next run may replace these without --overwrite-output-dir
EARLY_FILES = {"config.yaml", RUN_FILE, "data_report.json", "noisytune_report.json", "tensorboard"}
FINISHED = ("model", "metrics.json")


class RunFolderError(ValueError):
    """A run folder that cannot be written (or read) as asked; one line naming the folder."""


def new_run_id() -> str:
    return uuid.uuid4().hex


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint_examples(dataset: Any, column: str = "input_ids") -> str:
    """SHA-256 over the token ids of every example, in order (the data the run trained on, exactly)."""
    digest = hashlib.sha256()
    for ids in dataset[column]:
        digest.update(json.dumps(list(ids), separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _staging(out: Path) -> Path:
    return out.parent / f".{out.name}.staging"


def prepare(out: Path, *, overwrite: bool, resuming: bool) -> Path:
    """The folder to write the run into: ``out`` itself, or a staging folder when overwriting a finished run."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--output-dir {out} is a file, not a folder")
    stage = _staging(out)
    if stage.exists():
        shutil.rmtree(stage)  # left by a run that failed while replacing this folder
    present = {p.name for p in out.iterdir()} if out.is_dir() else set()
    finished = any(name in present for name in FINISHED)
    if present and not (overwrite or resuming) and present - EARLY_FILES:
        raise RunFolderError(
            f"output folder {out} already holds {', '.join(sorted(present - EARLY_FILES))}; pass "
            "--overwrite-output-dir or --resume-from-checkpoint, or choose another --output-dir"
        )
    target = stage if (overwrite and finished and not resuming) else out
    if target == out and present and not resuming:
        logger.warning(
            "%s holds files of an unfinished run (%s); they are replaced", out, ", ".join(sorted(present))
        )
        for name in present:
            path = out / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / ".noisyft-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunFolderError(f"cannot write the run folder {out}: {exc.strerror or exc}") from None
    if target != out:
        logger.info(
            "%s holds a finished run: the new run is written to %s and replaces it when done", out, target
        )
    return target


def finish(work: Path, out: Path) -> None:
    """Move a staged run into place (the old run is removed only once the new one is complete)."""
    if work == out:
        return
    old = out.parent / f".{out.name}.replaced"
    if old.exists():
        shutil.rmtree(old)
    os.replace(out, old)
    os.replace(work, out)
    shutil.rmtree(old)


def model_stamp(run: dict[str, Any]) -> dict[str, Any]:
    return {"run_id": run["run_id"], "config_sha256": run["config_sha256"]}


def check_run_folder(run_dir: str | os.PathLike) -> None:
    """Refuse a run folder whose ``model/`` and settings come from different runs, or whose ``config.yaml`` was
    changed after the run. Folders written before this protocol (no ``run.json``) pass with a warning."""
    run_dir = Path(run_dir)
    run_file, stamp_file = run_dir / RUN_FILE, run_dir / "model" / MODEL_STAMP
    if not run_file.is_file() or "run_id" not in _read(run_file):
        logger.warning(
            "%s has no run identity (written before noisyft 0.2): its parts are not checked", run_dir
        )
        return
    run = _read(run_file)
    config = (run_dir / "config.yaml").read_text(encoding="utf-8")
    if sha256_text(config) != run.get("config_sha256"):
        raise RunFolderError(
            f"{run_dir / 'config.yaml'} is not the config this run was trained with (its hash differs from "
            f"{run_file}); restore it, or evaluate the model folder directly"
        )
    if not stamp_file.is_file():
        raise RunFolderError(f"{run_dir / 'model'} has no {MODEL_STAMP}: it was not written by this run")
    stamp = _read(stamp_file)
    if stamp.get("run_id") != run["run_id"]:
        raise RunFolderError(
            f"{run_dir / 'model'} was written by run {stamp.get('run_id')}, but {run_file} describes run "
            f"{run['run_id']}: the model and the settings do not belong together"
        )


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunFolderError(f"{path} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path} is not a JSON object")
    return data
