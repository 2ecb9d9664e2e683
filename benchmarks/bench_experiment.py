"""`noisyft experiment` costs: orchestration overhead per trial, and report rendering time.

    .venv/bin/python benchmarks/bench_experiment.py                  # both measurements, tiny model, CPU
    .venv/bin/python benchmarks/bench_experiment.py --skip-overhead  # only the report rendering (seconds)

1. Overhead. The same tiny-model trials (a 2-layer Llama built offline, 16 training records, `--max-steps 2`,
   eval `analyses: [loss]` on 8 held-out records) are run two ways, interleaved so machine noise hits both:
   by hand, as the two commands a trial is (`python -m noisyft.cli train --config ... --output-dir ...` then
   `python -m noisyft.cli eval run RUN --config ...`), and as one `noisyft experiment run` over the same trials
   (1 variant x N seeds, one worker). Two overheads: direct, the experiment's wall time outside its trials' two
   commands (summed from the trial records) over the commands' time, which is free of machine noise; and A/B,
   (experiment wall - hand wall) / hand wall, which also carries the noise between the two runs on a shared
   machine. Both leave out the report, written once at the end of a run and timed apart. Orchestration = the
   experiment command's start, the Optuna study in SQLite, spec checks, trial records.
2. Report rendering. A 12-trial experiment (4 variants x 3 seeds, loss + memorization + lengths results from the
   test suite's fake trial command) is reported 3 times; the median wall time of `write_report` is kept.

Results go to benchmarks/results/experiment-cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FAKE = ROOT / "tests" / "experiment_fixtures" / "fake_noisyft.py"


def _env() -> dict[str, str]:
    src = str(ROOT / "src")
    return {
        **os.environ,
        "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }


def tiny_inputs(root: Path) -> tuple[dict, dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_llama, tiny_tokenizer

    model = root / "tinymodel"
    tiny_llama().save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    for name, n in (("train", 16), ("heldout", 8)):
        with (root / f"{name}.jsonl").open("w") as f:
            for i in range(n):
                f.write(
                    json.dumps(
                        {"instruction": f"write hello w{i}", "input": "", "output": f"hello world w{i}"}
                    )
                    + "\n"
                )
    train = {"model": str(model), "data": str(root / "train.jsonl"), "max_steps": 2, "per_device_train_batch_size": 4,
             "logging_steps": 1, "eval_data": "none", "method": "neftune"}  # fmt: skip
    evals = {
        "analyses": ["loss"],
        "heldout": [str(root / "heldout.jsonl")],
        "heldout_max_examples": 8,
        "batch_size": 4,
    }
    return train, evals


def by_hand(root: Path, train: dict, evals: dict, seeds: list[int]) -> float:
    """The trials as a user would run them: the two commands per trial, one after the other."""
    t0 = time.perf_counter()
    for seed in seeds:
        d = root / f"s{seed}"
        d.mkdir(parents=True)
        (d / "train.yaml").write_text(yaml.safe_dump({**train, "seed": seed}))
        (d / "eval.yaml").write_text(yaml.safe_dump(evals))
        base = [sys.executable, "-m", "noisyft.cli"]
        with open(d / "log", "w") as log:
            for cmd in (
                [*base, "train", "--config", str(d / "train.yaml"), "--output-dir", str(d / "run")],
                [*base, "eval", "run", str(d / "run"), "--config", str(d / "eval.yaml")],
            ):
                subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=_env())
    return time.perf_counter() - t0


def as_experiment(root: Path, train: dict, evals: dict, seeds: list[int]) -> tuple[float, float, float]:
    """(wall of `noisyft experiment run` over the same trials, wall of its report step alone, wall of the trial
    commands inside it, summed from the trial records)."""
    spec = {"name": "bench", "train": {k: v for k, v in train.items() if k != "method"}, "eval": evals,
            "seeds": seeds, "variants": {"neftune": {"method": train["method"]}}}  # fmt: skip
    root.mkdir(parents=True)
    (root / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    cmd = [sys.executable, "-m", "noisyft.experiment.cli", "run", str(root / "spec.yaml"), "--output-dir",
           str(root / "out"), "--no-progress"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([*cmd[:3], "report", str(root / "out")], check=True, stdout=subprocess.DEVNULL, env=_env())
    report = time.perf_counter() - t0
    commands = 0.0
    for record in (root / "out" / "trials").glob("*/trial.json"):
        commands += sum(json.loads(record.read_text())["step_wall_s"].values())
    return wall, report, commands


def overhead(rounds: int, n_seeds: int) -> dict:
    seeds = list(range(1, n_seeds + 1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train, evals = tiny_inputs(Path(tmp))
        for r in range(rounds):
            order = ("hand", "experiment") if r % 2 == 0 else ("experiment", "hand")
            row = {}
            for how in order:
                if how == "hand":
                    row["hand_s"] = by_hand(Path(tmp) / f"hand{r}", train, evals, seeds)
                else:
                    got = as_experiment(Path(tmp) / f"exp{r}", train, evals, seeds)
                    row["experiment_s"], row["report_s"], row["experiment_commands_s"] = got
            orchestration = row["experiment_s"] - row["report_s"] - row["experiment_commands_s"]
            # direct: time the experiment process spends outside its trials' two commands (noise-free)
            row["orchestration_per_trial_s"] = orchestration / n_seeds
            row["orchestration_fraction"] = orchestration / row["experiment_commands_s"]
            # A/B: against the same commands run by hand (includes the machine's noise between the two runs)
            row["ab_overhead_fraction"] = (row["experiment_s"] - row["report_s"] - row["hand_s"]) / row[
                "hand_s"
            ]
            rows.append(row)
            print(json.dumps(row))
    return {
        "trials_per_round": n_seeds,
        "rounds": rows,
        "median_orchestration_fraction": statistics.median(r["orchestration_fraction"] for r in rows),
        "median_orchestration_per_trial_s": statistics.median(r["orchestration_per_trial_s"] for r in rows),
        "median_ab_overhead_fraction": statistics.median(r["ab_overhead_fraction"] for r in rows),
        "median_hand_per_trial_s": statistics.median(r["hand_s"] / n_seeds for r in rows),
        "median_report_s": statistics.median(r["report_s"] for r in rows),
    }


def report_time(repeats: int) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from noisyft.experiment.cli import main
    from noisyft.experiment.report import write_report

    with tempfile.TemporaryDirectory() as tmp:
        spec = {"name": "bench-report", "eval": {"analyses": ["loss", "memorization", "lengths"]}, "seeds": [1, 2, 3],
                "baseline": "plain", "variants": {"plain": {"method": "none"},
                                                  "neftune": {"method": "neftune", "neftune": {"alpha": [5, 10, 15]}}}}  # fmt: skip
        (Path(tmp) / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        out = Path(tmp) / "out"
        code = main(["run", str(Path(tmp) / "spec.yaml"), "--output-dir", str(out), "--workers", "2", "--no-progress",
                     "--launcher", f"{sys.executable} {FAKE}"])  # fmt: skip
        assert code == 0, code
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            paths = write_report(out)
            times.append(time.perf_counter() - t0)
        size = Path(paths["html"]).stat().st_size
    return {"trials": 12, "variants": 4, "seconds": times, "median_s": statistics.median(times),
            "html_bytes": size, "figures": paths["figures"], "tables": paths["tables"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seeds", type=int, default=2, help="trials per round and way")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / "experiment-cpu.json"))
    args = p.parse_args()
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "report_rendering": report_time(3),
    }
    print(json.dumps(result["report_rendering"]))
    if not args.skip_overhead:
        result["overhead"] = overhead(args.rounds, args.seeds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
