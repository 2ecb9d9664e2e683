"""What the mixin costs: step time of ``NoisyTrainer`` (mixin on ``transformers.Trainer``) against
``NoisySFTTrainer`` (mixin on TRL's ``SFTTrainer``) on the same SFT batch, and each against its base class.

"The same batch": one padded batch with labels (assistant-only labels are TRL's business before collation), fed
through the same collator (``default_data_collator``) to every trainer, with TRL's dataset preparation skipped,
so all four trainers see identical tensors. The remaining difference is each trainer's ``compute_loss``: the plain
``Trainer`` takes ``model(**batch).loss``; TRL's also computes the entropy and the token accuracy of the logits
for its logs. No method is attached (``NoisyTrainer`` / ``NoisySFTTrainer`` without ``neftune=``...): what is
timed is the mixin's machinery (compute-loss wrapper, finite-loss flag, pre-optimizer guard, log hook).

Each variant runs real ``trainer.train()`` calls; rounds are interleaved (a fresh order each round), the first step
of each call is untimed (warm-up), each timed step runs from ``on_step_begin`` to ``on_step_end``. Ratios are
medians of the per-round paired ratios, with a bootstrap 95% interval over rounds.

    flock /tmp/noisyft-bench.lock .venv/bin/python benchmarks/bench_mixin.py            # SmolLM2-135M, CPU
    .venv/bin/python benchmarks/bench_mixin.py --model tiny --rounds 3                  # quick look

Results: benchmarks/results/mixin-<device>-<model>.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_neftune import load_model  # noqa: E402
from gpu_suite import StepTimer, _train_args, fixed_batch  # noqa: E402

PAIRS = {
    "noisy_trainer_over_noisy_sft": ("NoisyTrainer", "NoisySFTTrainer"),
    "noisy_trainer_over_trainer": ("NoisyTrainer", "Trainer"),
    "noisy_sft_over_sft": ("NoisySFTTrainer", "SFTTrainer"),
}


def _ci(ratios: list[float], seed: int = 0) -> list[float]:
    import numpy as np
    from scipy.stats import bootstrap

    if len(set(ratios)) < 2:
        return [ratios[0], ratios[0]]
    res = bootstrap(
        (np.asarray(ratios),),
        np.median,
        n_resamples=5000,
        rng=np.random.default_rng(seed),
        method="percentile",
    )
    return [round(float(res.confidence_interval.low), 4), round(float(res.confidence_interval.high), 4)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="'smollm2' (embedded), 'tiny', or a model folder")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from transformers import Trainer, TrainingArguments, default_data_collator
    from trl import SFTConfig, SFTTrainer

    from noisyft import NoisySFTTrainer, NoisyTrainer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    from transformers import AutoTokenizer

    from noisyft.models import resolve_model_path

    base = load_model(args.model, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path("smollm2" if args.model == "tiny" else args.model)
    )
    total = 1 + args.steps
    ds, lengths = fixed_batch(base.config.vocab_size, args.batch, args.length, total)
    classes = {
        "Trainer": Trainer,
        "NoisyTrainer": NoisyTrainer,
        "SFTTrainer": SFTTrainer,
        "NoisySFTTrainer": NoisySFTTrainer,
    }
    times: dict[str, list[list[float]]] = {k: [] for k in classes}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for name, cls in classes.items():
            timer = StepTimer(cuda)
            common = _train_args(
                f"{tmp}/{name}",
                cuda,
                total,
                args.batch,
                learning_rate=1e-12,
                bf16=False,
                remove_unused_columns=False,
            )
            if issubclass(cls, SFTTrainer):
                targs = SFTConfig(**common, dataset_kwargs={"skip_prepare_dataset": True}, max_length=None)
            else:
                targs = TrainingArguments(**common)
            trainer = cls(
                model=copy.deepcopy(base).to(device),
                args=targs,
                train_dataset=ds,
                data_collator=default_data_collator,
                processing_class=tokenizer,
                callbacks=[timer],
            )
            trainers[name] = (trainer, timer)
        order = list(classes)
        rng = random.Random(0)
        for r in range(args.rounds):
            rng.shuffle(order)
            for name in order:
                trainer, timer = trainers[name]
                timer.times.clear()
                trainer.train()
                times[name].append(timer.times[1:])
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)

    round_median = {k: [statistics.median(v) for v in rounds] for k, rounds in times.items()}
    variants = {
        k: {"median_step_s": round(statistics.median(v), 5), "round_medians_s": [round(x, 5) for x in v]}
        for k, v in round_median.items()
    }
    ratios = {}
    for label, (a, b) in PAIRS.items():
        per_round = [x / y for x, y in zip(round_median[a], round_median[b], strict=True)]
        ratios[label] = {
            "ratio": round(statistics.median(per_round), 4),
            "ci95": _ci(per_round),
            "per_round": [round(x, 4) for x in per_round],
        }
    load = os.getloadavg()
    report = {
        "benchmark": "mixin_step",
        "command": "python benchmarks/bench_mixin.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "parameters": sum(p.numel() for p in base.parameters()),
        "batch": {"size": args.batch, "row_width": args.length, "lengths": lengths, "tokens": sum(lengths)},
        "precision": "float32",
        "attn_implementation": "sdpa",
        "rounds": args.rounds,
        "timed_steps_per_round": args.steps,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "load_average_at_end": [round(x, 2) for x in load],
        "host": platform.node(),
        "torch": torch.__version__,
        "variants": variants,
        "ratios": ratios,
        "target": "noisy_trainer_over_noisy_sft <= 1.01",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = (
        Path(args.out)
        if args.out
        else HERE / "results" / f"mixin-{device.type}-{Path(args.model).name.lower()}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name, v in variants.items():
        print(f"{name:<18}{v['median_step_s']:>10.4f} s")
    for label, r in ratios.items():
        print(f"{label:<32}{r['ratio']:>8.4f}  95% CI {r['ci95']}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
