"""`noisyft experiment run`: resume after kill -9, failing trials, searches, on a fake trial command.

The trial command is `tests/experiment_fixtures/fake_noisyft.py`, passed as the launcher, so these tests
exercise the real runner, Optuna study and subprocess handling in seconds (the real train + eval run in
test_experiment_e2e.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from noisyft.experiment.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
FAKE = Path(__file__).resolve().parent / "experiment_fixtures" / "fake_noisyft.py"
LAUNCHER = f"{sys.executable} {FAKE}"


def write_spec(path: Path, **over) -> Path:
    spec = {
        "name": "fake",
        "train": {"max_steps": 2},
        "eval": {"analyses": ["loss"]},
        "seeds": [1, 2],
        "baseline": "plain",
        "variants": {"plain": {"method": "none"}, "neftune": {"method": "neftune", "neftune": {"alpha": 5}}},
    }
    spec.update(over)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli(*args: str, env_extra: dict | None = None, **kw) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        **(env_extra or {}),
    }
    cmd = [sys.executable, "-m", "noisyft.experiment.cli", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def states(out: Path) -> dict[str, str]:
    found = {}
    for p in sorted((out / "trials").glob("*/trial.json")):
        with open(p) as f:  # a trial.json is written atomically, so a read never sees half a file
            found[p.parent.name] = json.load(f)["state"]
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_resume_after_kill_9_reruns_only_the_interrupted_trial(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml")
    out = tmp_path / "out"
    proc = cli("run", str(spec), "--output-dir", str(out), "--launcher", LAUNCHER, "--no-progress",
               env_extra={"FAKE_TRAIN_S": "0.6"})  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline:  # wait for one trial done and the next one training
        s = states(out)
        if list(s.values()).count("complete") == 1 and "running" in s.values():
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"experiment did not get going: {states(out)} {proc.communicate()}")
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [t for t, s in states(out).items() if s == "complete"]
    killed = [t for t, s in states(out).items() if s == "running"]
    assert len(done) == 1 and len(killed) == 1
    done_dir, killed_dir = out / "trials" / done[0], out / "trials" / killed[0]
    # the training child of the killed experiment died with it (no orphan keeps writing into the trial)
    child = int((killed_dir / "train_calls.txt").read_text().split()[-1])
    for _ in range(50):
        if not alive(child):
            break
        time.sleep(0.05)
    assert not alive(child)
    mtimes = {p: p.stat().st_mtime_ns for p in done_dir.rglob("*") if p.is_file()}

    rerun = cli("run", str(spec), "--output-dir", str(out), "--launcher", LAUNCHER, "--no-progress")
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert "4/4 trials complete" in stdout
    assert set(states(out).values()) == {"complete"} and len(states(out)) == 4
    # the completed trial was not touched, the interrupted one trained again from scratch
    assert {p: p.stat().st_mtime_ns for p in done_dir.rglob("*") if p.is_file()} == mtimes
    assert len((done_dir / "train_calls.txt").read_text().split()) == 1
    assert len((killed_dir / "train_calls.txt").read_text().split()) == 2
    assert (killed_dir / "trial.log").read_text().count(" train --config ") == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["variants"]["neftune"]["metrics"]["loss.sharegpt:heldout"]["n"] == 2

    # a third run has nothing left to do and runs nothing
    third = cli("run", str(spec), "--output-dir", str(out), "--launcher", LAUNCHER, "--no-progress")
    stdout, _ = third.communicate(timeout=60)
    assert third.returncode == 0 and "4/4 trials complete (0 now" in stdout
    assert len((killed_dir / "train_calls.txt").read_text().split()) == 2


def test_a_failing_trial_is_recorded_with_its_error_and_the_others_finish(tmp_path, capsys):
    variants = {"plain": {"method": "none"}, "cursed": {"method": "none", "max_steps": 13}}
    spec = write_spec(tmp_path / "spec.yaml", variants=variants)
    out = tmp_path / "out"
    argv = [
        "run",
        str(spec),
        "--output-dir",
        str(out),
        "--launcher",
        LAUNCHER,
        "--no-progress",
        "--workers",
        "2",
    ]
    assert main(argv) == 1  # not every trial completed
    assert states(out) == {
        "cursed-s1": "failed",
        "cursed-s2": "failed",
        "plain-s1": "complete",
        "plain-s2": "complete",
    }
    record = json.loads((out / "trials" / "cursed-s1" / "trial.json").read_text())
    assert "train exited with status 3" in record["error"] and "cursed" in record["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert {t["id"]: t["state"] for t in summary["trials"]}["cursed-s2"] == "failed"
    assert "cursed" not in summary["variants"]  # no finished trial, no statistics
    assert "2/4 trials complete" in capsys.readouterr().out

    import optuna

    study = optuna.load_study(study_name="fake", storage=f"sqlite:///{out / 'study.db'}")
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 2 and all("status 3" in t.user_attrs["error"] for t in failed)
    # running again tries the failed cells once more (they fail again), and leaves the finished ones alone
    assert main(argv) == 1
    assert len((out / "trials" / "plain-s1" / "train_calls.txt").read_text().split()) == 1
    assert len((out / "trials" / "cursed-s1" / "train_calls.txt").read_text().split()) == 2


def test_search_runs_its_budget_with_tpe_and_records_the_metric(tmp_path):
    spec = write_spec(
        tmp_path / "spec.yaml",
        seeds=[1],
        baseline=None,
        variants={"neftune": {"method": "neftune", "neftune": {"alpha": {"low": 1, "high": 20}}}},
        search={"metric": "loss.sharegpt:heldout", "direction": "minimize", "n_trials": 3},
    )
    out = tmp_path / "out"
    assert main(["run", str(spec), "--output-dir", str(out), "--launcher", LAUNCHER, "--no-progress"]) == 0
    import optuna

    study = optuna.load_study(study_name="fake", storage=f"sqlite:///{out / 'study.db'}")
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 3
    for t in trials:  # the fake's closed form: mean held-out loss = 2.035 - 0.02 alpha + 0.001 seed
        assert 1 <= t.params["neftune.alpha"] <= 20
        assert t.value == pytest.approx(2.035 - 0.02 * t.params["neftune.alpha"] + 0.001, abs=1e-9)
        settings = yaml.safe_load((out / "trials" / t.user_attrs["trial_id"] / "train.yaml").read_text())
        assert settings["neftune_alpha" if "neftune_alpha" in settings else "neftune"] is not None
    assert json.loads((out / "summary.json").read_text())["baseline"] is None


def test_report_on_a_folder_without_finished_trials_says_so(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "nothing to report yet" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_work_needs_the_experiment_folder(tmp_path, capsys):
    assert main(["work", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("noisyft experiment: error:") and "experiment.yaml not found" in err


def test_a_second_worker_joins_the_study_and_no_trial_runs_twice(tmp_path):
    seeds = [1, 2]
    spec = write_spec(tmp_path / "spec.yaml", seeds=seeds)
    out = tmp_path / "out"
    slow = {"FAKE_TRAIN_S": "0.6"}
    first = cli(
        "run", str(spec), "--output-dir", str(out), "--launcher", LAUNCHER, "--no-progress", env_extra=slow
    )
    deadline = time.time() + 30
    while not (out / "experiment.yaml").is_file() and time.time() < deadline:
        time.sleep(0.05)
    second = cli("work", str(out), "--launcher", LAUNCHER, "--no-progress", env_extra=slow)
    for p in (first, second):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert sorted(states(out)) == sorted(f"{v}-s{s}" for v in ("plain", "neftune") for s in seeds)
    assert set(states(out).values()) == {"complete"}
    for t in (out / "trials").iterdir():
        assert len((t / "train_calls.txt").read_text().split()) == 1, t.name  # each cell trained once
    import optuna

    study = optuna.load_study(study_name="fake", storage=f"sqlite:///{out / 'study.db'}")
    workers = {t.user_attrs["pid"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(workers) == 2  # both processes ran trials


def _open_after(barrier, url: str, results) -> None:
    from noisyft.experiment.runner import open_storage

    barrier.wait()
    try:
        open_storage(url)
        results.put("ok")
    except Exception as exc:  # reported to the parent, which asserts on it
        results.put(f"{type(exc).__name__}: {exc}".splitlines()[0])


@pytest.mark.parametrize("guard", ["lock file", "retry only"])
def test_workers_that_open_a_new_sqlite_study_at_the_same_moment_all_succeed(tmp_path, monkeypatch, guard):
    # Optuna stamps a new database's schema on first open; unguarded, two workers starting together collide
    # ("UNIQUE constraint failed: alembic_version", seen in CI when `work` joined right after `run` began).
    # "retry only" takes the lock away, as for a server database: the retries alone must resolve the race.
    import contextlib
    import multiprocessing

    from noisyft.experiment import runner

    if guard == "retry only":
        monkeypatch.setattr(runner, "file_lock", lambda path: contextlib.nullcontext())

    import optuna  # noqa: F401  (imported once here, so the forked workers start at the same line)

    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        url = f"sqlite:///{tmp_path / f'study{round_}.db'}"
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_after, args=(barrier, url, results)) for _ in range(4)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert outcomes == ["ok"] * 4, outcomes


@pytest.mark.parametrize(
    "storage, says",
    [
        ("notaurl", "is not a database URL"),
        ("sqlite:///{tmp}/missing/study.db", "missing does not exist"),
        ("journal:{tmp}/missing/journal.log", "needs a file in an existing folder"),
        # no driver here, or connection refused; the password never reaches the message
        ("postgresql://nobody:hunter2@127.0.0.1:1/db", "cannot be opened"),
    ],
)
def test_a_storage_that_cannot_be_opened_is_a_one_line_error(tmp_path, capsys, storage, says):
    spec = write_spec(tmp_path / "spec.yaml")
    url = storage.format(tmp=tmp_path)
    code = main(["run", str(spec), "--output-dir", str(tmp_path / "out"), "--storage", url, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    shown = url.replace(":hunter2@", ":***@")
    assert err.startswith(f"noisyft experiment: error: storage {shown!r}") and says in err, err
    assert "hunter2" not in err
    # and no folder was made for the user's path
    assert "Traceback" not in err and not (tmp_path / "missing").exists()
