"""Wall time, CPU time and peak memory of the default `noisyft train` run (the README's main job), as a new user
runs it, measured with /usr/bin/time -v; variants interleaved round by round so they compare on a noisy machine.

    .venv/bin/python benchmarks/bench_default_run.py --rounds 3                          # the default run
    .venv/bin/python benchmarks/bench_default_run.py --rounds 3 --variant trl-loss="--compact-loss false"

The embedded model must already be converted (run `noisyft train` once). Writes
benchmarks/results/default-run-cpu.json (or --output): per variant, every run and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIELDS = {
    "wall_s": r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)",
    "user_s": r"User time \(seconds\): (\S+)",
    "sys_s": r"System time \(seconds\): (\S+)",
    "max_rss_gb": r"Maximum resident set size \(kbytes\): (\d+)",
}


def _seconds(text: str) -> float:
    parts = [float(p) for p in text.split(":")]
    return sum(p * 60**i for i, p in enumerate(reversed(parts)))


def run_once(extra: list[str]) -> dict:
    noisyft = Path(sys.executable).with_name("noisyft")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["/usr/bin/time", "-v", str(noisyft), "train", "--output-dir", f"{tmp}/run", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if proc.returncode != 0:
            raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        out = {}
        for key, pattern in FIELDS.items():
            value = re.search(pattern, proc.stderr).group(1)
            out[key] = _seconds(value) if key == "wall_s" else float(value)
        out["max_rss_gb"] = round(out["max_rss_gb"] / 1024**2, 3)
        metrics = json.loads(Path(f"{tmp}/run/metrics.json").read_text())
        out["train_runtime_s"] = metrics["train"].get("train_runtime")
        out["train_loss"] = metrics["train"].get("train_loss")
        out["heldout_loss"] = (metrics.get("eval") or {}).get("eval_loss")
        out["steps"] = max((h.get("step", 0) for h in metrics["log_history"]), default=0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar='NAME="FLAGS"',
        help="an extra variant: a name and the flags added to `noisyft train`",
    )
    ap.add_argument("--output", default="benchmarks/results/default-run-cpu.json")
    args = ap.parse_args(argv)
    variants = {"default": []}
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        variants[name] = shlex.split(flags)
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            t0 = time.time()
            runs[name].append(run_once(variants[name]))
            print(f"round {r + 1} {name}: {runs[name][-1]} ({time.time() - t0:.0f} s)", flush=True)
    result = {
        "command": "noisyft train (embedded defaults) under /usr/bin/time -v",
        "machine": {"cpus": os.cpu_count(), "torch_threads": os.environ.get("OMP_NUM_THREADS", "default")},
        "variants": {
            name: {
                "flags": variants[name],
                "runs": rs,
                "median": {
                    k: statistics.median(x[k] for x in rs)
                    for k in ("wall_s", "user_s", "sys_s", "max_rss_gb")
                },
            }
            for name, rs in runs.items()
        },
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    for name, v in result["variants"].items():
        print(name, v["median"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
