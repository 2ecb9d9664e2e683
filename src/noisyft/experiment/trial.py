"""One trial: `noisyft train` then `noisyft eval run`, each a subprocess, into ``DIR/trials/<trial-id>/``.

Folder of a trial::

    trial.json    id, variant, seed, settings, state (running / complete / failed), error, wall times
    train.yaml    the train settings of this trial (``noisyft train --config``)
    eval.yaml     the eval settings (``noisyft eval run <run> --config``)
    trial.log     stdout + stderr of both commands, every attempt appended with a header
    run/          the `noisyft train` run folder, with the eval results in run/eval/

A re-run of an interrupted trial keeps what finished (a run with metrics.json is not trained again, an eval
with summary.json is not evaluated again), resumes training from the last checkpoint when there is one
(``train: {save_steps: N}``), and otherwise starts that step from scratch.

Children run in their own process group, recorded in ``.pgid``, and (on Linux, with ``setpriv``) are killed
by the kernel when the experiment process dies, so a ``kill -9`` leaves no training running unseen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from noisyft._io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)


class TrialError(RuntimeError):
    """A trial's command failed; the message says which, with its exit status and last log line."""


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def noisyft_command(launcher: Sequence[str]) -> list[str]:
    """How a trial calls noisyft: ``python -m noisyft.cli``, or ``LAUNCHER -m noisyft.cli`` (torchrun, ...)."""
    return [*launcher, "-m", "noisyft.cli"] if launcher else [sys.executable, "-m", "noisyft.cli"]


def trial_commands(trial_dir: Path, launcher: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    base = noisyft_command(launcher)
    run = str(trial_dir / "run")
    train = [*base, "train", "--config", str(trial_dir / "train.yaml"), "--output-dir", run]
    evaluate = [*base, "eval", "run", run, "--config", str(trial_dir / "eval.yaml")]
    return train, evaluate


def _pdeathsig_prefix() -> list[str]:
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "KILL"] if setpriv else []


def kill_leftover(trial_dir: Path) -> None:
    """Kill the process group a previous, killed attempt left behind (recorded in ``.pgid``)."""
    pgid_file = trial_dir / ".pgid"
    if not pgid_file.is_file():
        return
    with contextlib.suppress(ValueError, OSError):
        pgid = int(pgid_file.read_text().strip())
        if pgid > 1 and pgid != os.getpgrp():
            os.killpg(pgid, signal.SIGKILL)
            logger.info(
                "%s: killed the process group %d left by an interrupted attempt", trial_dir.name, pgid
            )
    pgid_file.unlink(missing_ok=True)


def _last_line(log_path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [ln.strip() for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines()]
        for line in reversed(lines):
            if line and not line.startswith("=="):
                return line[:300]
    return ""


def _call(cmd: list[str], log_path: Path, trial_dir: Path, on_wait: Callable[[], None] | None) -> int:
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"== {datetime.now().isoformat(timespec='seconds')} $ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            [*_pdeathsig_prefix(), *cmd],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    atomic_write_text(trial_dir / ".pgid", f"{proc.pid}\n")
    try:
        while True:
            try:
                return proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                if on_wait is not None:
                    on_wait()
    finally:
        if proc.poll() is None:  # the worker is being stopped (Ctrl-C, an exception): take the trial down too
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        (trial_dir / ".pgid").unlink(missing_ok=True)


def _prepare_train(run: Path) -> list[str]:
    """Extra train flags for a re-run: resume from the last checkpoint, or start from scratch."""
    if run.is_dir() and any(run.glob("checkpoint-*")):
        return ["--resume-from-checkpoint", "last", "--overwrite-output-dir"]
    if run.exists():
        shutil.rmtree(run)
    return []


def write_trial_record(trial_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_json(trial_dir / "trial.json", record)


def run_trial(
    trial_dir: Path,
    train_settings: dict[str, Any],
    eval_settings: dict[str, Any],
    *,
    launcher: Sequence[str] = (),
    on_wait: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Train and evaluate one trial; return the wall time of each step. Raises TrialError on a failure."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    kill_leftover(trial_dir)
    atomic_write_text(trial_dir / "train.yaml", _yaml(train_settings))
    atomic_write_text(trial_dir / "eval.yaml", _yaml(eval_settings))
    log_path = trial_dir / "trial.log"
    run = trial_dir / "run"
    train_cmd, eval_cmd = trial_commands(trial_dir, launcher)
    walls: dict[str, float] = {}

    if (run / "metrics.json").is_file() and (run / "model").is_dir():
        logger.info("%s: training finished in an earlier attempt; not trained again", trial_dir.name)
    else:
        t0 = time.perf_counter()
        code = _call(train_cmd + _prepare_train(run), log_path, trial_dir, on_wait)
        walls["train_s"] = time.perf_counter() - t0
        if code != 0:
            raise TrialError(f"train exited with status {code}: {_last_line(log_path)} (log: {log_path})")

    if (run / "eval" / "summary.json").is_file():
        logger.info("%s: evaluation finished in an earlier attempt; not evaluated again", trial_dir.name)
    else:
        if (run / "eval").exists():
            shutil.rmtree(run / "eval")
        t0 = time.perf_counter()
        code = _call(eval_cmd, log_path, trial_dir, on_wait)
        walls["eval_s"] = time.perf_counter() - t0
        if code != 0:
            raise TrialError(f"eval run exited with status {code}: {_last_line(log_path)} (log: {log_path})")
    return walls
