"""The GPU suite: one command for the figures a CUDA machine should give (at most 30 minutes on one GPU).

1. Every registered method (noisyft.methods.REGISTRY, default settings) against plain training: median step time
   and peak ``torch.cuda.max_memory_allocated`` of a real ``NoisyTrainer.train()`` on one fixed padded batch, bf16
   mixed precision (float32 master weights, as ``noisyft train`` on a GPU), SDPA attention; again with
   flash-attention-2 where ``flash_attn`` is importable (the Fisher penalty excluded: its double backward needs
   SDPA / eager). Variants run in interleaved rounds (a fresh order each round, warm-up steps untimed); each
   variant's figure is the median over rounds of its per-round median.
2. Tokens/s of ``NoisySFTTrainer`` against TRL's own ``SFTTrainer`` on the same packed, padding-free data (BFD
   packing; TRL's ``num_tokens`` count over the timed steps), without noise and with NEFTune (ours:
   ``neftune=5``; TRL's: ``neftune_noise_alpha=5``).

    python benchmarks/gpu_suite.py                   # CUDA: SmolLM2-135M (embedded), writes gpu-suite-<gpu>.json
    python benchmarks/gpu_suite.py --model PATH      # another local model
    python benchmarks/gpu_suite.py --smoke           # CPU, tiny random model, seconds (run by the test suite)

Results: benchmarks/results/gpu-suite-<device>.json (``--out`` to change), with device and version metadata.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_neftune import PeakRSS  # noqa: E402  (the harness' CPU memory probe)


def _settings(smoke: bool, cuda: bool) -> dict:
    if smoke:
        return {
            "batch": 2,
            "length": 32,
            "steps": 2,
            "warmup": 1,
            "rounds": 1,
            "tps_steps": 2,
            "tps_warmup": 1,
        }
    return {
        "batch": 8,
        "length": 1024,
        "steps": 20,
        "warmup": 5,
        "rounds": 3,
        "tps_steps": 30,
        "tps_warmup": 5,
    }


def load_base(model: str, smoke: bool):
    """(model in float32 on the CPU, tokenizer). Smoke: a 2-layer random Llama over the first 512 ids of the
    embedded tokenizer (the data are random ids; the tokenizer gives the pad and end-of-text ids)."""
    from noisyft.models import load_model_and_tokenizer, resolve_model_path

    if not smoke:
        return load_model_and_tokenizer(model, dtype="float32", attn_implementation="sdpa")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    assert max(tokenizer.pad_token_id, tokenizer.eos_token_id) < 512
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"), tokenizer


class StepTimer:
    """A TrainerCallback timing each optimizer step (with a device sync on each side)."""

    def __new__(cls, cuda: bool):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []

            def _sync(self):
                if cuda:
                    torch.cuda.synchronize()

            def on_step_begin(self, args, state, control, **kw):
                self._sync()
                self._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self._sync()
                self.times.append(time.perf_counter() - self._t0)

        return _Timer()


def fixed_batch(vocab: int, batch: int, length: int, repeat: int):
    """``batch`` sequences with lengths spread over [length/4, length], padded to ``length``, the block repeated
    ``repeat`` times: with the sequential sampler every step sees the same batch."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    lengths = [length] + [int(x) for x in torch.randint(length // 4, length + 1, (batch - 1,), generator=g)]
    rows = []
    for n in lengths:
        ids = torch.randint(10, vocab, (n,), generator=g).tolist()
        pad = length - n
        rows.append(
            {
                "input_ids": ids + [0] * pad,
                "attention_mask": [1] * n + [0] * pad,
                "labels": ids + [-100] * pad,
            }
        )
    return Dataset.from_list(rows * repeat), lengths


def _variants(flash: bool) -> list[tuple[str, str | None, str]]:
    """(label, method or None, attention implementation)."""
    from noisyft.methods import REGISTRY

    out = [("plain", None, "sdpa")] + [(n, n, "sdpa") for n in REGISTRY]
    if flash:
        out += [("plain+fa2", None, "flash_attention_2")]
        out += [(f"{n}+fa2", n, "flash_attention_2") for n in REGISTRY if n != "fisher"]
    return out


def _train_args(out: str, cuda: bool, steps: int, batch: int, **overrides):
    """Training arguments shared by every timed trainer (bf16 autocast on CUDA, float32 on CPU)."""
    return (
        {
            "output_dir": out,
            "max_steps": steps,
            "per_device_train_batch_size": batch,
            "learning_rate": 1e-5,
            "lr_scheduler_type": "constant",
            "bf16": cuda,
            "use_cpu": not cuda,
            "report_to": "none",
            "save_strategy": "no",
            "logging_steps": 1,
            "disable_tqdm": True,
            "dataloader_num_workers": 0,
            "seed": 0,
            "activation_checkpointing": False,  # TRL's SFTConfig turns it on by default; every variant runs without
            "train_sampling_strategy": "sequential",  # fixed_batch's copies come in order: the same batch every step
        }
        | overrides
    )


def time_methods(base, s: dict, cuda: bool, flash: bool, tmp: str) -> dict:
    from transformers import TrainingArguments, default_data_collator

    from noisyft import NoisyTrainer
    from noisyft.methods import REGISTRY

    device = torch.device("cuda" if cuda else "cpu")
    ds, lengths = fixed_batch(base.config.vocab_size, s["batch"], s["length"], s["warmup"] + s["steps"])
    medians: dict[str, list[float]] = {}
    peaks: dict[str, list[int]] = {}
    variants = _variants(flash)
    rng = random.Random(0)
    for r in range(s["rounds"]):
        rng.shuffle(variants)
        for label, method, attn in variants:
            model = copy.deepcopy(base).to(device)
            model.set_attn_implementation(attn)  # checks that the kernel is installed
            timer = StepTimer(cuda)
            kwargs = {method: REGISTRY[method].config_class()()} if method else {}
            trainer = NoisyTrainer(
                model=model,
                args=TrainingArguments(
                    **_train_args(f"{tmp}/{label}", cuda, s["warmup"] + s["steps"], s["batch"])
                ),
                train_dataset=ds,
                data_collator=default_data_collator,
                callbacks=[timer],
                **kwargs,
            )
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                trainer.train()
                peak = (
                    torch.cuda.max_memory_allocated()
                    - before
                    + sum(p.numel() * p.element_size() for p in model.parameters())
                )
            else:
                with PeakRSS() as rss:
                    trainer.train()
                peak = rss.peak
            medians.setdefault(label, []).append(statistics.median(timer.times[s["warmup"] :]))
            peaks.setdefault(label, []).append(peak)
            del trainer, model
        print(f"methods: round {r + 1}/{s['rounds']}", file=sys.stderr)

    results = {}
    for label, method, attn in sorted(variants, key=lambda v: (v[2], v[0] != "plain", v[0])):
        ref = "plain" if attn == "sdpa" else "plain+fa2"
        t, t0 = statistics.median(medians[label]), statistics.median(medians[ref])
        m, m0 = max(peaks[label]), max(peaks[ref])
        results[label] = {
            "method": method or "none",
            "attn_implementation": attn,
            "median_step_s": round(t, 5),
            "round_medians_s": [round(x, 5) for x in medians[label]],
            "time_ratio_to_plain": round(t / t0, 4),
            "peak_mem_mb": round(m / 2**20, 1),
            "mem_ratio_to_plain": round(m / m0, 4),
        }
    batch = {"size": s["batch"], "row_width": s["length"], "lengths": lengths, "tokens": sum(lengths)}
    return {"batch": batch, "variants": results}


def packed_dataset(vocab: int, n_docs: int, max_len: int):
    """Pre-tokenized documents (lengths 16..max_len/2) for TRL's BFD packing; the same for every trainer."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(1)
    lens = torch.randint(16, max(17, max_len // 2), (n_docs,), generator=g).tolist()
    return Dataset.from_list(
        [{"input_ids": torch.randint(10, vocab, (n,), generator=g).tolist()} for n in lens]
    )


def tokens_per_second(base, tokenizer, s: dict, cuda: bool, tmp: str) -> dict:
    from trl import SFTConfig, SFTTrainer

    from noisyft import NEFTuneConfig, NoisySFTTrainer

    device = torch.device("cuda" if cuda else "cpu")
    total = s["tps_warmup"] + s["tps_steps"]
    ds = packed_dataset(base.config.vocab_size, total * s["batch"] * 6, s["length"])
    variants = {
        "trl_sft": (SFTTrainer, {}, {}),
        "noisyft_sft": (NoisySFTTrainer, {}, {}),
        "trl_neftune": (SFTTrainer, {"neftune_noise_alpha": 5.0}, {}),
        "noisyft_neftune": (NoisySFTTrainer, {}, {"neftune": NEFTuneConfig(alpha=5.0)}),
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    rng = random.Random(1)
    for r in range(s["rounds"]):
        rng.shuffle(order)
        for name in order:
            cls, cfg_extra, kwargs = variants[name]
            timer = StepTimer(cuda)
            args = SFTConfig(
                **_train_args(f"{tmp}/{name}", cuda, total, s["batch"]),
                max_length=s["length"],
                packing=True,
                packing_strategy="bfd",
                completion_only_loss=False,
                **cfg_extra,
            )
            model = copy.deepcopy(base).to(device)
            trainer = cls(
                model=model,
                args=args,
                train_dataset=ds,
                processing_class=tokenizer,
                callbacks=[timer],
                **kwargs,
            )
            trainer.train()
            seen = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h and "loss" in h]
            tokens = seen[-1] - seen[s["tps_warmup"] - 1]
            rates[name].append(tokens / sum(timer.times[s["tps_warmup"] :]))
            del trainer, model
        print(f"tokens/s: round {r + 1}/{s['rounds']}", file=sys.stderr)
    out = {
        name: {"tokens_per_s": round(statistics.median(v), 1), "rounds": [round(x, 1) for x in v]}
        for name, v in rates.items()
    }
    out["noisyft_over_trl"] = round(out["noisyft_sft"]["tokens_per_s"] / out["trl_sft"]["tokens_per_s"], 4)
    out["noisyft_neftune_over_trl_neftune"] = round(
        out["noisyft_neftune"]["tokens_per_s"] / out["trl_neftune"]["tokens_per_s"], 4
    )
    return out


def _metadata(cuda: bool) -> dict:
    import transformers
    import trl

    meta = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        meta |= {"device": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1)}
    else:
        meta |= {"device": "cpu", "cpu_threads": torch.get_num_threads()}
    return meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="'smollm2' (embedded) or a local model folder")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny random model, a few steps")
    parser.add_argument(
        "--out", default=None, help="results JSON (default benchmarks/results/gpu-suite-<device>.json)"
    )
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        parser.error("no CUDA device: the suite measures GPU figures (use --smoke for the CPU check)")
    s = _settings(args.smoke, cuda)
    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    start = time.perf_counter()
    base, tokenizer = load_base(args.model, args.smoke)
    with tempfile.TemporaryDirectory() as tmp:
        methods = time_methods(base, s, cuda, flash, tmp)
        tps = tokens_per_second(base, tokenizer, s, cuda, tmp)
    meta = _metadata(cuda)
    report = {
        "benchmark": "gpu_suite",
        "command": "python benchmarks/gpu_suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "smoke": args.smoke,
        "model": "tiny random Llama (smoke)" if args.smoke else args.model,
        "parameters": sum(p.numel() for p in base.parameters()),
        "precision": "bf16 autocast, float32 master weights" if cuda else "float32",
        "flash_attention_2": flash,
        "settings": s,
        "metadata": meta,
        "memory_note": "CUDA: peak max_memory_allocated of the whole train() (weights, gradients, optimizer "
        "state, activations); CPU (smoke): peak resident set of the process during train()",
        "methods": methods,
        "tokens_per_s": tps,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    tag = re.sub(r"[^a-z0-9]+", "-", meta["device"].lower()).strip("-")
    out = Path(args.out) if args.out else HERE / "results" / f"gpu-suite-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'variant':<18}{'step s':>9}{'x plain':>9}{'peak MB':>10}{'x plain':>9}")
    for label, r in methods["variants"].items():
        print(
            f"{label:<18}{r['median_step_s']:>9.4f}{r['time_ratio_to_plain']:>9.3f}"
            f"{r['peak_mem_mb']:>10.1f}{r['mem_ratio_to_plain']:>9.3f}"
        )
    for name in ("trl_sft", "noisyft_sft", "trl_neftune", "noisyft_neftune"):
        print(f"{name:<18}{tps[name]['tokens_per_s']:>12.1f} tokens/s")
    print(f"results: {out} ({report['wall_s']} s)")
    return 0 if all(math.isfinite(r["time_ratio_to_plain"]) for r in methods["variants"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
