"""Fisher penalty step cost (token-F, logit-F) next to the plain step: a sweep over sequence lengths and threads.

One model, one fixed batch per length, AdamW; variants interleaved round-robin in a fresh random order every round:

  plain          loss.backward(): the model as loaded (SDPA), no penalty
  token-F        shared forward and LM head: CE and token-F from the same logits (what NoisySFTTrainer does);
                 the SDPA calls run noisyft's fused-forward / explicit-double-backward attention
  logit-F        the same with logit-F
  token-F-sub25  token-F on a random 25% subset of the predicted positions, reweighted (normalizer k = |P|/4):
                 unbiased; is it cheaper? (the double backward still runs through every layer)
  token-F-math   token-F with SDPA on its math backend (the previous implementation), for reference
  token-F-ca     token-F with the outer backward under compiled autograd (inductor, static shapes): fuses the
                 second-order graph's elementwise work; its first step compiles (timed apart:
                 ``first_step_s_compile_included``)

Time: every round runs every variant once; the ratio of a variant is taken against ``plain`` *in the same round*
(paired, so a machine shared with other jobs moves both), and summarized by the geometric mean of the per-round
ratios with a 95% t-interval on their logarithms (a bootstrap of 3-10 rounds is not an interval). Rounds continue
past ``--min-rounds`` until token-F's and logit-F's intervals each lie on one side of ``--target`` (the interval
is narrower than the gap), or ``--max-rounds`` / ``--max-seconds`` is hit. ``probability=0.25`` (the gated option)
costs ``1 + 0.25 (r - 1)`` in expectation, r token-F's ratio, from the same rounds.

Memory: every variant runs again in its own fresh process (glibc told to mmap large blocks so freed memory leaves
the resident set): its peak resident set during the steps above the level before them (model, AdamW state:
"step") and that peak plus the level ("total", what a GPU's ``max_memory_allocated`` reads). On CUDA the
allocator's peaks.

``--variance`` (one length): mean and variance of the full, gated (p = 0.25) and subset (25% of positions)
estimates over independent draws on the same batch, so that their variances compare at their measured costs.

    .venv/bin/python benchmarks/bench_fisher.py --lengths 128,512,1024,2048 --threads 2     # one JSON, cell by cell
    .venv/bin/python benchmarks/bench_fisher.py --lengths 512 --threads 1 --variance 64
    .venv/bin/python benchmarks/bench_fisher.py --model tiny --lengths 32 --max-rounds 3    # quick check

Cells (threads x length) are added to ``--out`` (default benchmarks/results/fisher-sweep-<device>-<model>.json),
so a sweep can run in pieces.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_neftune import PeakRSS, load_model  # noqa: E402

from noisyft.methods.fisher.penalty import (  # noqa: E402
    capture_forward,
    fisher_penalty,
    fisher_penalty_from_hidden,
    logits_from_hidden,
    next_token_targets,
    predicted_positions,
)

IMPLEMENTATION = (
    "attention: CPU flash kernel forward and first backward, blocked explicit double backward (64 query rows, "
    "causal blocks skipped); LM head: chunked FusedHead (128 rows), no (N, V) tensor kept"
)
# the default set; token-F-ca only on request (its first step compiles for minutes)
VARIANTS = ("plain", "token-F", "logit-F", "token-F-sub25", "token-F-math")
COEF = 1e-3  # any positive value: cost does not depend on it
GATE_P = 0.25
SUBSET = 0.25


def make_batch(vocab: int, batch: int, length: int, device) -> dict[str, torch.Tensor]:
    """Full rows (no padding), every position predicted: the "full masks" case, the most work for the penalty."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (batch, length), generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": ids.to(device),
    }


def subset_penalty(model, batch, *, fraction: float, generator, create_graph=True, return_loss=False):
    """token-F on k = ceil(fraction |P|) predicted positions drawn without replacement, normalized by k: an
    unbiased estimate of the full penalty (each position is in the subset with probability k / |P|)."""
    base = model
    with capture_forward(model) as cap:
        model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False, logits_to_keep=1)
    pred = predicted_positions(
        tuple(batch["input_ids"].shape), labels=batch["labels"], device=cap.embeds.device
    )
    hidden = cap.hidden[pred]  # (N, D)
    n = hidden.shape[0]
    k = max(1, math.ceil(fraction * n))
    idx = torch.randperm(n, generator=generator, device=hidden.device)[:k]
    penalty = fisher_penalty_from_hidden(
        base, cap.embeds, hidden[idx], generator=generator, create_graph=create_graph
    )  # the chunked LM head, as the full estimate uses
    if not return_loss:
        return penalty
    logits = logits_from_hidden(base, hidden)  # the CE on every position, as the trainer computes it
    targets = next_token_targets(batch["input_ids"], pred, batch["labels"])
    return penalty, torch.nn.functional.cross_entropy(logits, targets)


class Stepper:
    def __init__(self, model, batch, device):
        self.model, self.batch, self.device = model, batch, device
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        self.gen = torch.Generator(device=device).manual_seed(0)

    def loss(self, variant: str) -> torch.Tensor:
        m, b = self.model, self.batch
        if variant == "plain":
            return m(**b).loss
        if variant in ("token-F", "logit-F", "token-F-math", "token-F-ca"):
            kind = "logit" if variant == "logit-F" else "token"
            sdpa = "math" if variant == "token-F-math" else "fused"
            pen, ce = fisher_penalty(m, **b, kind=kind, generator=self.gen, return_loss=True, sdpa=sdpa)
            return ce + COEF * pen
        if variant == "token-F-sub25":
            pen, ce = subset_penalty(m, b, fraction=SUBSET, generator=self.gen, return_loss=True)
            return ce + COEF * pen
        raise ValueError(variant)

    def step(self, variant: str) -> float:
        """Wall seconds of one step; the process's CPU seconds of it go to ``self.cpu_s``."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = self.loss(variant)
        if variant == "token-F-ca":
            from torch._dynamo import compiled_autograd

            with compiled_autograd._enable(_inductor_static, dynamic=False):
                loss.backward()
        else:
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.cpu_s = time.process_time() - c0
        return time.perf_counter() - t0


def _inductor_static(graph):
    return torch.compile(graph, backend="inductor", dynamic=False)


def setup(args, length: int):
    device = torch.device(args.device)
    model = (
        load_model(args.model, attn_implementation="sdpa").to(device=device, dtype=args.torch_dtype).train()
    )
    batch = make_batch(model.config.vocab_size, args.batch, length, device)
    return model, batch, device


def memory_of(variant: str, args) -> dict:
    """Run one variant in this (fresh) process: peak memory of its steps above the level before them."""
    model, batch, device = setup(args, args.lengths[0])
    s = Stepper(model, batch, device)
    s.step("plain")  # AdamW state exists from here on, like in training
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        s.step(variant)
        peak = torch.cuda.max_memory_allocated()
        return {
            "pre_step_mb": base / 2**20,
            "step_peak_mb": (peak - base) / 2**20,
            "source": "cuda allocator",
        }
    with PeakRSS() as rss:
        s.step(variant)
    return {
        "pre_step_mb": rss.base / 2**20,  # model, AdamW state, torch and Python
        "step_peak_mb": rss.growth / 2**20,
        "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "source": "resident set (MALLOC_MMAP_THRESHOLD_=65536), sampled every ms",
    }


def measure_memory(args, threads: int, length: int, variants) -> dict[str, dict]:
    memory = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    for v in variants:
        cmd = [sys.executable, __file__, "--memory-only", v, "--model", args.model, "--dtype", args.dtype]
        cmd += ["--batch", str(args.batch), "--lengths", str(length), "--threads", str(threads)]
        cmd += ["--device", args.device]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        memory[v] = json.loads(res.stdout.strip().splitlines()[-1])
        print(
            f"  memory {v}: step {memory[v]['step_peak_mb']:.0f} MB over {memory[v]['pre_step_mb']:.0f}",
            flush=True,
        )
    p = memory["plain"]
    for m in memory.values():
        m["total_mb"] = m["pre_step_mb"] + m["step_peak_mb"]
        m["step_memory_x_plain"] = m["step_peak_mb"] / p["step_peak_mb"]
        m["total_memory_x_plain"] = m["total_mb"] / (p["pre_step_mb"] + p["step_peak_mb"])
    return memory


def ratio_summary(ratios: list[float]) -> dict:
    """Geometric mean of paired per-round ratios and a 95% t-interval on their logarithms."""
    from scipy import stats

    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    half = (
        stats.t.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / len(logs) ** 0.5
        if len(logs) > 1
        else math.inf
    )
    return {
        "x_plain": math.exp(mean),
        "ci95": [math.exp(mean - half), math.exp(mean + half)],
        "rounds": len(ratios),
    }


def decided(times, target: float) -> bool:
    for v in ("token-F", "logit-F"):
        if v in times:
            lo, hi = ratio_summary(paired(times, v))["ci95"]
            if lo <= target <= hi:
                return False
    return True


def paired(times, v):
    return [a / b for a, b in zip(times[v], times["plain"], strict=True)]


def time_cell(args, length: int, variants) -> dict:
    model, batch, device = setup(args, length)
    stepper = Stepper(model, batch, device)
    stepper.step("plain")  # warm-up: AdamW state exists from here on
    compile_s = {v: stepper.step(v) for v in variants if v.endswith("-ca")}  # first step: the compile
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    order, rng, t0 = list(variants), random.Random(0), time.perf_counter()
    for r in range(args.max_rounds):
        rng.shuffle(order)
        for v in order:
            times[v].append(stepper.step(v))
            cpu[v].append(stepper.cpu_s)
        print(f"  round {r + 1}: " + ", ".join(f"{v} {times[v][-1]:.2f}s" for v in variants), flush=True)
        if r + 1 >= args.min_rounds and (
            decided(times, args.target) or time.perf_counter() - t0 > args.max_seconds
        ):
            break
    rows = {}
    for v in variants:
        rows[v] = {"median_step_s": statistics.median(times[v]), **ratio_summary(paired(times, v))}
        # CPU seconds of this process: less moved by other jobs on a shared machine than wall time
        rows[v]["cpu"] = {"median_step_s": statistics.median(cpu[v]), **ratio_summary(paired(cpu, v))}
    r = rows["token-F"]
    rows["token-F-gated-p25 (expected)"] = {
        "x_plain": 1 + GATE_P * (r["x_plain"] - 1),
        "ci95": [1 + GATE_P * (c - 1) for c in r["ci95"]],
    }
    extra = {"first_step_s_compile_included": compile_s} if compile_s else {}
    return {"time": rows, "raw_times_s": times, "raw_cpu_s": cpu, **extra}


def variance_cell(args, length: int, draws: int) -> dict:
    """Full, gated and subset estimates: mean and variance over independent draws (create_graph=False)."""
    model, batch, device = setup(args, length)
    gen = torch.Generator(device=device).manual_seed(1)
    full = torch.stack(
        [fisher_penalty(model, **batch, generator=gen, create_graph=False) for _ in range(draws)]
    )
    sub = torch.stack(
        [
            subset_penalty(model, batch, fraction=SUBSET, generator=gen, create_graph=False)
            for _ in range(draws)
        ]
    )
    full, sub = full.detach().double(), sub.detach().double()
    mean, var = full.mean().item(), full.var().item()
    gated_var = (var + mean**2) / GATE_P - mean**2  # Var[(B/p) R] = E[R^2]/p - E[R]^2, B ~ Bernoulli(p)
    return {
        "draws": draws,
        "full": {"mean": mean, "var": var, "cv": var**0.5 / mean},
        "gated_p25": {"mean": mean, "var": gated_var, "var_x_full": gated_var / var},
        "subset_25pct": {
            "mean": sub.mean().item(),
            "mean_se": (sub.var().item() / draws) ** 0.5,
            "var": sub.var().item(),
            "var_x_full": sub.var().item() / var,
        },
    }


MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_scaled_dot_product")


def profile_cell(args, length: int, variants) -> dict:
    """One profiled step per variant (after one warm-up step each): self CPU seconds of the matrix products
    (mm, bmm, addmm, the fused attention kernels) and of everything else (elementwise work, reductions, copies,
    Python), each as a ratio to the plain step's. Shows which part of a penalty step is above 2x plain."""
    from torch.profiler import ProfilerActivity, profile

    model, batch, device = setup(args, length)
    stepper = Stepper(model, batch, device)
    rows, top = {}, {}
    for v in variants:
        stepper.step(v)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            wall = stepper.step(v)
        events = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_cpu_time_total > 0]
        matmul = sum(e.self_cpu_time_total for e in events if e.key.startswith(MATMUL_OPS)) / 1e6
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        rows[v] = {"wall_s": wall, "matmul_s": matmul, "other_s": total - matmul, "self_cpu_total_s": total}
        events.sort(key=lambda e: -e.self_cpu_time_total)
        top[v] = [
            {
                "op": e.key,
                "shapes": str(e.input_shapes)[:120],
                "calls": e.count,
                "self_s": e.self_cpu_time_total / 1e6,
            }
            for e in events[:25]
        ]
    for v in variants:
        for part in ("matmul", "other"):
            rows[v][f"{part}_x_plain"] = rows[v][f"{part}_s"] / rows["plain"][f"{part}_s"]
        print(
            f"  {v:<14} wall {rows[v]['wall_s']:.1f}s  matmul {rows[v]['matmul_s']:.1f}s "
            f"({rows[v]['matmul_x_plain']:.2f}x)  other {rows[v]['other_s']:.1f}s ({rows[v]['other_x_plain']:.2f}x)",
            flush=True,
        )
    return {"rows": rows, "top_ops": top}


def table(result: dict) -> str:
    """The README's markdown table from a sweep JSON: time ratio [95% CI], step and total memory ratios."""
    lines = [
        "| threads | tokens | variant | step time x plain [95% CI] | rounds | step memory x plain | total memory x plain |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cell in result["cells"].values():
        times, memory = cell.get("time", {}), cell.get("memory", {})
        for v in [*times, *(m for m in memory if m not in times)]:
            if v == "plain":
                continue
            r, mem = times.get(v), memory.get(v)
            step = f"{mem['step_memory_x_plain']:.2f}" if mem else "-"
            total = f"{mem['total_memory_x_plain']:.2f}" if mem else "-"
            ratio = f"{r['x_plain']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if r else "not timed"
            lines.append(
                f"| {cell['threads']} | {cell['batch']} x {cell['length']} | {v} | {ratio} "
                f"| {r.get('rounds', '-') if r else '-'} | {step} | {total} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2', 'tiny' or a model path")
    p.add_argument("--lengths", default="128,512,1024,2048", help="tokens per row, comma-separated")
    p.add_argument("--threads", default="2", help="torch CPU threads, comma-separated")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--target", type=float, default=2.0, help="stop once token-F / logit-F intervals exclude this"
    )
    p.add_argument("--min-rounds", type=int, default=3)
    p.add_argument("--max-rounds", type=int, default=12)
    p.add_argument("--max-seconds", type=float, default=600, help="per cell, after --min-rounds")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-time", action="store_true", help="memory only (load-independent)")
    p.add_argument("--variance", type=int, default=0, help="draws for the estimator-variance cell (0: none)")
    p.add_argument(
        "--profile", action="store_true", help="a profiled step per variant instead of timing rounds"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default=None)
    p.add_argument("--memory-only", default=None, help=argparse.SUPPRESS)
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.torch_dtype = getattr(torch, args.dtype)
    threads = [int(x) for x in args.threads.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    if "plain" not in variants or "token-F" not in variants:
        raise SystemExit("--variants must include plain and token-F")
    if args.memory_only:
        torch.set_num_threads(threads[0])
        print(json.dumps(memory_of(args.memory_only, args)))
        return 0

    device = torch.device(args.device)
    out = Path(args.out) if args.out else HERE / "results" / f"fisher-sweep-{device.type}-{args.model}.json"
    if args.table:
        print(table(json.loads(out.read_text())))
        return 0
    result = (
        json.loads(out.read_text())
        if out.exists()
        else {"benchmark": "fisher penalty step cost sweep", "cells": {}}
    )
    result.update(
        {
            "model": args.model,
            "dtype": args.dtype,
            "batch_rows": args.batch,
            "num_samples": 1,
            "masks": "full (every position predicted, no padding)",
            "device": str(device),
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "gate_probability": GATE_P,
            "subset_fraction": SUBSET,
            "ratio_statistic": "geometric mean of per-round paired ratios, 95% t-interval on the logs",
            "implementation": IMPLEMENTATION,
        }
    )
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for length in args.lengths:
            key = f"{n_threads}t-{length}"
            print(f"cell {key} (batch {args.batch} x {length}, {n_threads} threads)", flush=True)
            load = os.getloadavg()
            cell = {
                "threads": n_threads,
                "length": length,
                "batch": args.batch,
                "when": datetime.now().isoformat(timespec="seconds"),
            }
            if args.variance:
                cell["variance"] = variance_cell(args, length, args.variance)
            elif args.profile:
                cell["profile"] = profile_cell(args, length, variants)
            else:
                if not args.no_time:
                    cell.update(time_cell(args, length, variants))
                if not args.no_memory:
                    cell["memory"] = measure_memory(args, n_threads, length, variants)
            cell["loadavg_before_after"] = [load, os.getloadavg()]
            cell["command"] = "python benchmarks/bench_fisher.py " + " ".join(
                argv if argv is not None else sys.argv[1:]
            )
            key = key + ("-variance" if args.variance else "-profile" if args.profile else "")
            result["cells"][key] = {**result["cells"].get(key, {}), **cell}
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            os.replace(tmp, out)
            for v, r in cell.get("time", {}).items():
                mem = cell.get("memory", {}).get(v, {})
                print(
                    f"  {v:<28} {r['x_plain']:.2f}x [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"
                    + (f"  total mem {mem['total_memory_x_plain']:.2f}x" if mem else ""),
                    flush=True,
                )
            if "variance" in cell:
                print("  " + json.dumps(cell["variance"]), flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
