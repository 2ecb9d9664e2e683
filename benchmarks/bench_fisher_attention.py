"""One attention layer's cost in a Fisher penalty step, next to the plain step's, at the shapes of SmolLM2-135M.

Per repetition, on one (B, 9 heads, L, 64) causal layer in float32:

  plain     SDPA forward + backward (what a plain training step does)
  penalty   noisyft's attention: forward, the penalty's gradient (``create_graph=True``) and the outer backward
            through both (a random linear form of out, dQ, dK, dV), i.e. the double backward included
  penalty@REV (with ``--baseline REV``) the same with ``noisyft/methods/fisher/attention.py`` as of git revision REV,
            loaded side by side, for a before/after in one run

Best of ``--reps`` after one warm-up, interleaved; results to JSON.

    .venv/bin/python benchmarks/bench_fisher_attention.py --lengths 512,1024,2048 --baseline 422c693
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent


def _module_at(rev: str):
    source = subprocess.run(
        ["git", "show", f"{rev}:src/noisyft/methods/fisher/attention.py"],
        cwd=HERE.parent, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "attention_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("attention_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _step(fn, q, k, v, w, second: bool) -> float:
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    t0 = time.perf_counter()
    out = fn(q, k, v)
    if second:
        do = w[0].clone().requires_grad_()
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), do, create_graph=True)
        ((dq * w[1]).sum() + (dk * w[2]).sum() + (dv * w[3]).sum() + (out * w[1]).sum()).backward()
    else:
        (out * w[0]).sum().backward()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="512,1024,2048")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--baseline", default=None, help="git revision whose attention.py to time side by side")
    p.add_argument("--out", default=str(HERE / "results" / "fisher-attention-cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from noisyft.methods.fisher import attention as current

    variants = {
        "plain": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), False),
        "penalty": (lambda q, k, v: current.attention(q, k, v, is_causal=True), True),
    }
    if args.baseline:
        old = _module_at(args.baseline)
        variants[f"penalty@{args.baseline}"] = (lambda q, k, v: old.attention(q, k, v, is_causal=True), True)
    cells = {}
    for length in [int(x) for x in args.lengths.split(",")]:
        g = torch.Generator().manual_seed(0)
        q, k, v, *w = (torch.randn(args.batch, 9, length, 64, generator=g) for _ in range(7))
        times = {name: [] for name in variants}
        for _ in range(args.reps + 1):
            for name, (fn, second) in variants.items():
                times[name].append(_step(fn, q, k, v, w, second))
        best = {name: min(ts[1:]) for name, ts in times.items()}
        cells[str(length)] = {
            "best_ms": {n: 1000 * t for n, t in best.items()},
            "x_plain": {n: t / best["plain"] for n, t in best.items()},
        }
        print(
            length, {n: f"{1000 * t:.1f} ms ({t / best['plain']:.2f}x)" for n, t in best.items()}, flush=True
        )
    result = {
        "benchmark": "one causal attention layer: plain step vs Fisher penalty step",
        "shape": f"({args.batch}, 9, L, 64) float32, causal",
        "threads": args.threads,
        "torch": torch.__version__,
        "when": datetime.now().isoformat(timespec="seconds"),
        "loadavg": os.getloadavg(),
        "command": "python benchmarks/bench_fisher_attention.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "cells": cells,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
