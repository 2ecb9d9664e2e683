"""Fisher penalty step cost (token-F, logit-F) next to the plain step, measured side by side in one run.

One model, one fixed batch, AdamW; variants interleaved round-robin in a fresh random order every round:

  plain        loss.backward(): the model as loaded (SDPA), no penalty
  plain-math   the same with SDPA forced to its math backend (what the penalty needs), to separate kernel cost
  token-F      shared forward and LM head: CE and token-F from the same logits (what NoisySFTTrainer does)
  logit-F      the same with logit-F
  token-F-2fw  the straightforward implementation: plain loss, then a second forward for fisher_penalty()
  token-F-p25  the cheaper unbiased option: the penalty on 25% of steps, scaled by 4 (mean step time; timed on a
               fixed 1-in-4 schedule, training draws it at random)

Time: median step (forward + backward + AdamW step), ratios to ``plain``. Memory: every variant runs again in its
own fresh process (glibc told to mmap large blocks so freed memory leaves the resident set) and reports its peak
resident set during the steps above the level before them (model, AdamW state) and the whole process's peak RSS.
The variance of the gated estimate against the full one is measured on the same batch.

    .venv/bin/python benchmarks/bench_fisher.py                                   # SmolLM2-135M, batch 2 x 128
    .venv/bin/python benchmarks/bench_fisher.py --attn eager                      # the issue's reference setting
    .venv/bin/python benchmarks/bench_fisher.py --model tiny --rounds 6           # quick check

Results go to benchmarks/results/fisher-<device>-<model>-<attn>.json.
"""

from __future__ import annotations

import argparse
import json
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

from noisyft.methods.fisher.penalty import differentiable_attention, fisher_penalty  # noqa: E402

VARIANTS = ("plain", "plain-math", "token-F", "logit-F", "token-F-2fw", "token-F-p25")
COEF = 1e-3  # any positive value: cost does not depend on it
GATE_P = 0.25


def load(name: str, attn: str):
    return load_model(name, attn_implementation=attn)


def make_batch(vocab: int, batch: int, length: int, device) -> dict[str, torch.Tensor]:
    """Full rows (no padding), every position predicted: the "full masks" case, the most work for the penalty."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (batch, length), generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": ids.to(device),
    }


class Stepper:
    def __init__(self, model, batch, device):
        self.model, self.batch, self.device = model, batch, device
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.calls = 0

    def loss(self, variant: str) -> torch.Tensor:
        m, b = self.model, self.batch
        if variant == "token-F-p25":
            # timing: a fixed 1-in-4 schedule, so the mean over steps is the cost at probability 0.25 (training
            # draws the gate at random; the expected cost is the same)
            self.calls += 1
            variant = "token-F" if self.calls % round(1 / GATE_P) == 0 else "plain"
            scale = 1 / GATE_P
        else:
            scale = 1.0
        if variant == "plain":
            return m(**b).loss
        if variant == "plain-math":
            with differentiable_attention(m):
                return m(**b).loss
        if variant in ("token-F", "logit-F"):
            kind = "token" if variant == "token-F" else "logit"
            pen, ce = fisher_penalty(m, **b, kind=kind, generator=self.gen, return_loss=True)
            return ce + COEF * scale * pen
        if variant == "token-F-2fw":
            ce = m(**b).loss
            return ce + COEF * fisher_penalty(m, **b, generator=self.gen)
        raise ValueError(variant)

    def step(self, variant: str) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.loss(variant).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def memory_of(variant: str, args) -> dict:
    """Run one variant in this (fresh) process: peak memory of its steps above the level before them."""
    device = torch.device(args.device)
    model = load(args.model, args.attn).to(device).train()
    s = Stepper(model, make_batch(model.config.vocab_size, args.batch, args.length, device), device)
    s.step("plain")  # AdamW state exists from here on, like in training
    for _ in range(2):
        s.step(variant)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(args.memory_steps):
            s.step(variant)
        return {
            "step_peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20,
            "process_peak_mb": torch.cuda.max_memory_allocated() / 2**20,
            "source": "cuda allocator",
        }
    with PeakRSS() as rss:
        for _ in range(args.memory_steps):
            s.step(variant)
    return {
        "pre_step_mb": rss.base / 2**20,  # model, AdamW state, torch and Python
        "step_peak_mb": rss.growth / 2**20,
        "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "source": "resident set (MALLOC_MMAP_THRESHOLD_=65536), sampled every ms",
    }


def measure_memory(args) -> dict[str, dict]:
    """Each variant in its own fresh process (glibc returns large freed blocks to the OS)."""
    memory = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--memory-only", v, "--model", args.model, "--attn", args.attn]
        cmd += ["--batch", str(args.batch), "--length", str(args.length), "--device", args.device]
        cmd += ["--memory-steps", str(args.memory_steps)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        memory[v] = json.loads(res.stdout.strip().splitlines()[-1])
        print(
            f"memory {v}: {memory[v]['step_peak_mb']:.0f} MB over the pre-step level "
            f"({memory[v].get('pre_step_mb', float('nan')):.0f} MB: model, AdamW state)",
            flush=True,
        )
    return memory


def memory_fields(memory: dict[str, dict], v: str) -> dict[str, float]:
    """Step memory (above model + AdamW state) and total (pre-step level + step peak), and their ratios."""
    m, p = memory[v], memory["plain"]
    out = {"step_peak_mb": m["step_peak_mb"], "step_memory_x_plain": m["step_peak_mb"] / p["step_peak_mb"]}
    if "pre_step_mb" in m and "pre_step_mb" in p:
        total, total_p = m["pre_step_mb"] + m["step_peak_mb"], p["pre_step_mb"] + p["step_peak_mb"]
        out.update(
            {"pre_step_mb": m["pre_step_mb"], "total_mb": total, "total_memory_x_plain": total / total_p}
        )
    return out


def gated_variance(model, batch, device, draws: int) -> dict:
    """Mean and variance of the full estimate R (over y') and of the gated one (B/p) R, B ~ Bernoulli(p)."""
    gen = torch.Generator(device=device).manual_seed(1)
    vals = torch.stack(
        [fisher_penalty(model, **batch, generator=gen, create_graph=False).detach() for _ in range(draws)]
    ).double()
    gate = torch.rand(draws, generator=torch.Generator().manual_seed(2), dtype=torch.float64) < GATE_P
    gated = vals * gate.to(vals.device) / GATE_P
    mean, var = vals.mean().item(), vals.var().item()
    return {
        "draws": draws,
        "full": {"mean": mean, "var": var, "cv": var**0.5 / mean},
        "gated_p25_measured": {"mean": gated.mean().item(), "var": gated.var().item()},
        # Var[(B/p) R] = E[R^2]/p - E[R]^2
        "gated_p25_expected_var": (var + mean**2) / GATE_P - mean**2,
        "variance_ratio_gated_over_full": ((var + mean**2) / GATE_P - mean**2) / var,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2', 'tiny' or a model path")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (each runs every variant once)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--variance-draws", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None)
    p.add_argument("--memory-only", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--memory-rerun", action="store_true", help="re-measure memory into an existing --out file"
    )
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_only:
        print(json.dumps(memory_of(args.memory_only, args)))
        return 0
    if args.memory_rerun:
        out = Path(args.out)
        result = json.loads(out.read_text())
        memory = measure_memory(args)
        for v, row in result["variants"].items():
            for key in ("process_peak_mb", "process_memory_x_plain"):
                row.pop(key, None)
            row.update(memory_fields(memory, v))
        result["memory_measured"] = datetime.now().isoformat(timespec="seconds")
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)
        print(f"updated {out}")
        return 0

    device = torch.device(args.device)
    model = load(args.model, args.attn).to(device).train()
    batch = make_batch(model.config.vocab_size, args.batch, args.length, device)
    stepper = Stepper(model, batch, device)
    for _ in range(args.warmup):
        for v in VARIANTS:
            stepper.step(v)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    rng = random.Random(0)
    for r in range(args.rounds):
        rng.shuffle(order)
        for v in order:
            times[v].append(stepper.step(v))
        print(
            f"round {r + 1}/{args.rounds}: " + ", ".join(f"{v} {times[v][-1]:.2f}s" for v in VARIANTS),
            flush=True,
        )

    variance = gated_variance(model, batch, device, args.variance_draws)

    memory = measure_memory(args)

    plain_t = statistics.median(times["plain"])
    rows = {}
    for v in VARIANTS:
        med = statistics.median(times[v]) if v != "token-F-p25" else statistics.mean(times[v])
        rows[v] = {
            "step_s": med,
            "statistic": "mean" if v == "token-F-p25" else "median",
            "quartiles_s": statistics.quantiles(times[v], n=4) if len(times[v]) >= 2 else None,
            "time_x_plain": med / plain_t,
            **memory_fields(memory, v),
        }
    result = {
        "benchmark": "fisher penalty step cost",
        "command": "python benchmarks/bench_fisher.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "when": datetime.now().isoformat(timespec="seconds"),
        "model": args.model,
        "attn_implementation": args.attn,
        "batch": [args.batch, args.length],
        "num_samples": 1,
        "masks": "full (every position predicted, no padding)",
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rounds": args.rounds,
        "gate_probability": GATE_P,
        "variants": rows,
        "expected_gated_time_x_plain": 1 + GATE_P * (rows["token-F"]["time_x_plain"] - 1),
        "gated_variance": variance,
        "raw_times_s": times,
    }
    out = (
        Path(args.out)
        if args.out
        else HERE / "results" / f"fisher-{device.type}-{args.model}-{args.attn}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"\n{'variant':<13} {'step':>8} {'x plain':>8} {'mem x plain':>12}")
    for v, r in rows.items():
        print(f"{v:<13} {r['step_s']:>7.2f}s {r['time_x_plain']:>8.2f} {r['step_memory_x_plain']:>12.2f}")
    print(
        f"gated p={GATE_P}: variance x{variance['variance_ratio_gated_over_full']:.1f} of the full estimate"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
