"""Step cost of every method, measured side by side in one run: NEFTune and the rest of the family.

Trains one model on one fixed batch with these variants, interleaved round-robin in a fresh random order every
round, so that machine noise hits all of them alike:

  (a) plain              no noise
  (b) transformers       transformers' own NEFTune hook (neftune_noise_alpha; padded-length scale)
  (c) noisyft            noisyft's NEFTune hook, per-sequence scale, padding masked
  (d) noisyft packed     the same sequences packed into one padding-free row (position_ids), noisyft per-document
  (d0) plain packed      the packed row without noise (the fair baseline for d)
  (e) symnoise           SymNoise's symmetric pair X + delta, X - delta as one doubled batch (two copies/step)
  (e1) symnoise 1-copy   SymNoise with pair=False: one noisy copy through the hook, NEFTune's cost
  (c2) neftune doubled   NEFTune on the batch stacked twice: the per-forward reference for (e), same tokens
  (f) lnsr               the LNSR penalty, noise at layer 0 (default): one extra decoder forward and backward
  (f2) lnsr mid          LNSR with the noise at the middle layer (the layers below it are not recomputed)
  (g) mixout             Mixout p=0.1 on every decoder Linear (the default selection)
  (h) recadam            RecAdam (default settings) instead of AdamW

The methods (e)-(h) run through their own plug-ins (``noisyft.methods.<name>.plugin``), called the way the
trainer calls them; set-up that happens once per training (Mixout's attach, the hooks) stays outside the timing.

Reports the median step time (forward + backward + optimizer step) and the peak memory of a step (CUDA: allocator
peak; CPU: peak resident-set growth sampled every millisecond), the ratios to (a), and for each ratio a bootstrap
95% interval over rounds (each round's ratio is taken between steps of that same round).

    .venv/bin/python benchmarks/bench_neftune.py                       # SmolLM2-135M, batch 4 x 256, CPU
    .venv/bin/python benchmarks/bench_neftune.py --model tiny --steps 30
    .venv/bin/python benchmarks/bench_neftune.py --only a_plain,c_noisyft_neftune,g_mixout
    .venv/bin/python benchmarks/bench_neftune.py --time-default-run    # also time `noisyft train` with defaults

Results go to benchmarks/results/neftune-<device>-<time>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


class PeakRSS:
    """Peak resident-set size of this process during a block, sampled from /proc every millisecond."""

    def __init__(self):
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        self.base = self._rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def load_model(name: str, attn_implementation: str | None = None):
    """SmolLM2 ('smollm2'), a model path, or 'tiny' (a 4-layer Llama from a config, seed 0), in float32."""
    if name == "tiny":
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        )
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    from noisyft.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(name, dtype="float32", attn_implementation=attn_implementation)
    return model


def make_batches(vocab: int, batch: int, length: int, seed: int, device):
    """One padded batch with lengths spread over [length/4, length], and the same sequences packed in one row."""
    g = torch.Generator().manual_seed(seed)
    lengths = [length] + [int(x) for x in torch.randint(length // 4, length + 1, (batch - 1,), generator=g)]
    seqs = [torch.randint(10, vocab, (n,), generator=g) for n in lengths]
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    padded = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    packed_ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    packed_labels = packed_ids.clone()
    packed_labels[position_ids == 0] = -100
    packed = {"input_ids": packed_ids, "position_ids": position_ids, "labels": packed_labels}
    move = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    return move(padded), move(packed), lengths


class _TrainerShim:
    """What the plug-ins read of a trainer (duck-typed, as in ``noisyft.methods.base``)."""

    def __init__(self, model, lr: float):
        from types import SimpleNamespace

        self.model = model
        self.args = SimpleNamespace(
            learning_rate=lr,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_epsilon=1e-8,
            weight_decay=0.0,
            gradient_checkpointing=False,
            seed=0,
        )

    def plugin(self, name):
        return None

    def get_decay_parameter_names(self, model):
        return [n for n, _ in model.named_parameters() if "norm" not in n and "bias" not in n]


class Variant:
    """One benchmarked step: a batch, optional noise hook, optional method plug-in, its optimizer."""

    def __init__(self, batch, *, noise=None, plugin=None, optimizer=None):
        self.batch, self.noise, self.plugin, self.optimizer = batch, noise, plugin, optimizer


def _plugin(name: str, config, shim):
    from noisyft.methods import REGISTRY

    plugin = REGISTRY[name].plugin_class()(config, seed=0, rank=0)
    plugin.on_init(shim)
    return plugin


def build_variants(model, args, device, only: set[str] | None) -> tuple[dict[str, Variant], list[int]]:
    from noisyft.methods.lnsr.config import LNSRConfig
    from noisyft.methods.mixout.config import MixoutConfig
    from noisyft.methods.recadam.config import RecAdamConfig
    from noisyft.methods.symnoise.config import SymNoiseConfig

    padded, packed, lengths = make_batches(model.config.vocab_size, args.batch, args.length, 0, device)
    doubled = {k: torch.cat([v, v]) for k, v in padded.items()}
    lr = 1e-12  # the step runs; the weights barely move
    shim = _TrainerShim(model, lr)
    adamw = torch.optim.AdamW(model.parameters(), lr=lr)
    n_layers = model.config.num_hidden_layers
    makers = {
        "a_plain": lambda: Variant(padded),
        "b_transformers_neftune": lambda: Variant(padded, noise="transformers"),
        "c_noisyft_neftune": lambda: Variant(padded, noise="noisyft"),
        "d_noisyft_packed": lambda: Variant(packed, noise="noisyft"),
        "d0_plain_packed": lambda: Variant(packed),
        "c2_neftune_doubled": lambda: Variant(doubled, noise="noisyft"),
        "e_symnoise": lambda: Variant(
            padded, plugin=_plugin("symnoise", SymNoiseConfig(alpha=args.alpha), shim)
        ),
        "e1_symnoise_one_copy": lambda: Variant(
            padded, plugin=_plugin("symnoise", SymNoiseConfig(alpha=args.alpha, pair=False), shim)
        ),
        "f_lnsr": lambda: Variant(padded, plugin=_plugin("lnsr", LNSRConfig(), shim)),
        "f2_lnsr_mid": lambda: Variant(padded, plugin=_plugin("lnsr", LNSRConfig(layer=n_layers // 2), shim)),
        "g_mixout": lambda: Variant(padded, plugin=_plugin("mixout", MixoutConfig(), shim)),
        "h_recadam": lambda: Variant(padded, plugin=_plugin("recadam", RecAdamConfig(), shim)),
    }
    unknown = (only or set()) - set(makers)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(makers)}")
    variants = {}
    for name, make in makers.items():
        if only and name not in only and name != "a_plain":
            continue
        v = make()
        if v.optimizer is None and v.plugin is not None:
            v.optimizer = v.plugin.create_optimizer(shim, model)
        v.optimizer = v.optimizer or adamw
        variants[name] = v
    return variants, lengths


def bootstrap_ratio(num: list[float], den: list[float], reps: int = 2000) -> list[float]:
    """95% interval of median(num) / median(den) over rounds, resampling rounds (paired)."""
    rng = random.Random(1)
    n = len(num)
    ratios = []
    for _ in range(reps):
        idx = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(num[i] for i in idx) / statistics.median(den[i] for i in idx))
    ratios.sort()
    return [round(ratios[int(0.025 * reps)], 4), round(ratios[int(0.975 * reps) - 1], 4)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="'smollm2' (embedded), 'tiny', or a model folder")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--alpha", type=float, default=5.0)
    parser.add_argument("--attn", default="sdpa", help="attention implementation")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--only", default=None, help="comma-separated variant names (plain always runs)")
    parser.add_argument(
        "--time-default-run", action="store_true", help="also time `noisyft train` (defaults)"
    )
    parser.add_argument("--out", default=None, help="results JSON path")
    args = parser.parse_args(argv)

    from transformers.integrations.neftune import activate_neftune, deactivate_neftune

    from noisyft.methods.neftune.config import NEFTuneConfig
    from noisyft.methods.neftune.noise import NEFTuneHook

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = load_model(args.model).to(device)
    model.config._attn_implementation = args.attn
    model.train()
    only = set(args.only.split(",")) if args.only else None
    variants, lengths = build_variants(model, args, device, only)
    padded = variants["a_plain"].batch
    ours = NEFTuneHook(NEFTuneConfig(alpha=args.alpha), seed=0)
    shim = _TrainerShim(model, 1e-12)

    def default_loss(batch):
        return lambda b=None, n=None: model(**(batch if b is None else b)).loss

    def step(v: Variant) -> tuple[float, int]:
        handle = None
        if v.noise == "transformers":
            handle = activate_neftune(model, args.alpha)
        elif v.noise == "noisyft":
            ours.attach(model)
        if v.plugin is not None:
            v.plugin.before_train(shim, model, fresh=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            if v.plugin is None:
                loss = model(**v.batch).loss
            else:
                loss = v.plugin.compute_loss(
                    shim,
                    model,
                    v.batch,
                    return_outputs=False,
                    num_items_in_batch=None,
                    default=default_loss(v.batch),
                )
            loss.backward()
            v.optimizer.step()
            v.optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else rss.growth
        if v.plugin is not None:
            v.plugin.after_train(shim, model)
        if v.noise == "transformers":
            deactivate_neftune(model, handle)
        elif v.noise == "noisyft":
            ours.detach()
        return elapsed, peak

    times = {k: [] for k in variants}
    peaks = {k: [] for k in variants}
    order = list(variants)
    rng = random.Random(0)
    for i in range(args.warmup + args.steps):
        rng.shuffle(order)  # interleaved, in a fresh order every round
        for name in order:
            t, m = step(variants[name])
            if i >= args.warmup:
                times[name].append(t)
                peaks[name].append(m)
        print(f"round {i + 1}/{args.warmup + args.steps}", file=sys.stderr)

    results = {}
    base_t = statistics.median(times["a_plain"])
    base_m = max(peaks["a_plain"])
    for name in variants:
        med = statistics.median(times[name])
        peak = max(peaks[name])
        results[name] = {
            "median_step_s": round(med, 5),
            "step_s_quartiles": [round(q, 5) for q in statistics.quantiles(times[name], n=4)],
            "peak_mem_mb": round(peak / 2**20, 1),
            "time_ratio_to_plain": round(med / base_t, 4),
            "time_ratio_ci95": bootstrap_ratio(times[name], times["a_plain"]),
            "mem_ratio_to_plain": round(peak / base_m, 4) if base_m > 0 else None,
        }

    def paired(num: str, den: str, key: str) -> None:
        if num in times and den in times:
            results[num][key] = round(statistics.median(times[num]) / statistics.median(times[den]), 4)
            results[num][key + "_ci95"] = bootstrap_ratio(times[num], times[den])

    paired("d_noisyft_packed", "d0_plain_packed", "time_ratio_to_plain_packed")
    # SymNoise per forward pass it makes: the pair (2B rows) against NEFTune on the same 2B rows; one copy
    # against NEFTune on B rows
    paired("e_symnoise", "c2_neftune_doubled", "time_ratio_to_neftune_same_tokens")
    paired("e1_symnoise_one_copy", "c_noisyft_neftune", "time_ratio_to_neftune_same_tokens")

    # The hooks' own cost, timed in isolation on this batch's embeddings: a precise bound on the overhead that
    # the step medians above can only resolve to within the machine's noise.
    from transformers.integrations.neftune import neftune_post_forward_hook

    with torch.no_grad():
        embeds = model.get_input_embeddings()(padded["input_ids"])
    embedding = model.get_input_embeddings()
    ours._batch = {"attention_mask": padded["attention_mask"]}

    def time_call(fn, reps=30):
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    with torch.enable_grad():
        embedding.train()
        embedding.neftune_noise_alpha = args.alpha
        t_theirs = time_call(lambda: neftune_post_forward_hook(embedding, None, embeds))
        del embedding.neftune_noise_alpha
        t_ours = time_call(lambda: ours._add_noise(embedding, None, embeds))
    hook_cost = {
        "transformers_hook_ms": round(t_theirs * 1e3, 3),
        "noisyft_hook_ms": round(t_ours * 1e3, 3),
        "noisyft_hook_fraction_of_plain_step": round(t_ours / base_t, 6),
    }

    report = {
        "benchmark": "neftune_step",
        "command": "python benchmarks/bench_neftune.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": {"size": args.batch, "row_width": args.length, "lengths": lengths, "tokens": sum(lengths)},
        "alpha": args.alpha,
        "attn_implementation": args.attn,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
        "cpu_threads": torch.get_num_threads(),
        "load_average_1_5_15min_at_end": [round(x, 2) for x in os.getloadavg()],  # other jobs on the machine
        "host": platform.node(),
        "torch": torch.__version__,
        "memory_note": "CUDA: allocator peak above the pre-step level; CPU: peak RSS growth during the step "
        "(allocator caching makes CPU figures coarse)",
        "results": results,
        "hook_cost": hook_cost,
    }

    if args.time_default_run:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "noisyft.cli", "train", "--output-dir", os.path.join(tmp, "run")]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            report["default_train_run"] = {
                "command": "noisyft train",
                "wall_s": round(time.perf_counter() - t0, 1),
                "returncode": proc.returncode,
                "tail": proc.stdout[-600:],
            }

    out = (
        Path(args.out)
        if args.out
        else HERE / "results" / (f"neftune-{device.type}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'variant':<26}{'median s':>10}{'x plain':>9}{'95% CI':>17}{'peak MB':>10}{'x plain':>9}")
    for name, r in results.items():
        lo, hi = r["time_ratio_ci95"]
        print(
            f"{name:<26}{r['median_step_s']:>10.4f}{r['time_ratio_to_plain']:>9.3f}{f'[{lo:.3f}, {hi:.3f}]':>17}"
            f"{r['peak_mem_mb']:>10.1f}{(r['mem_ratio_to_plain'] or 0):>9.3f}"
        )
        if "time_ratio_to_neftune_same_tokens" in r:
            lo, hi = r["time_ratio_to_neftune_same_tokens_ci95"]
            print(
                f"{'  vs NEFTune, same tokens':<26}{r['time_ratio_to_neftune_same_tokens']:>19.3f} [{lo:.3f}, {hi:.3f}]"
            )
    print(
        f"hook alone: noisyft {hook_cost['noisyft_hook_ms']} ms, transformers {hook_cost['transformers_hook_ms']} ms "
        f"({100 * hook_cost['noisyft_hook_fraction_of_plain_step']:.3f}% of a plain step)"
    )
    if "default_train_run" in report:
        print(f"default `noisyft train`: {report['default_train_run']['wall_s']} s")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
