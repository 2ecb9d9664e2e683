"""A stand-in for `python -m noisyft.cli` in the experiment tests, used as `--launcher "python fake_noisyft.py"`.

`train` sleeps FAKE_TRAIN_S seconds, fails when max_steps is 13, and writes a run folder with metrics.json;
`eval run` writes loss / memorization / lengths files whose values are a closed form of the seed and alpha:
per-example held-out loss = 2 + 0.01 i - 0.02 alpha + 0.001 seed, so a variant's paired difference against
plain is exactly -0.02 alpha.
"""

import json
import os
import sys
import time
from pathlib import Path

import yaml

args = sys.argv[1:]
assert args[:2] == ["-m", "noisyft.cli"], args
args = args[2:]


def opt(name):
    return args[args.index(name) + 1]


def alpha_of(cfg):
    if cfg.get("method", "neftune") == "none":
        return 0.0
    return float(cfg.get("neftune_alpha", (cfg.get("neftune") or {}).get("alpha", 5.0)))


if args[0] == "train":
    cfg = yaml.safe_load(Path(opt("--config")).read_text())
    out = Path(opt("--output-dir"))
    calls = out.parent / "train_calls.txt"
    with calls.open("a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(float(os.environ.get("FAKE_TRAIN_S", "0")))
    if cfg.get("max_steps") == 13:
        print("boom: max_steps 13 is cursed", file=sys.stderr)
        sys.exit(3)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model").mkdir(exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    seed, alpha = cfg["seed"], alpha_of(cfg)
    history = [
        {"step": s, "loss": 3.0 - 0.1 * s + 0.01 * seed, "neftune/noise_to_embed_norm": 0.01 * alpha * s}
        for s in range(1, 6)
    ]
    metrics = {
        "train": {"train_loss": 2.5 + 0.01 * seed},
        "eval": {"eval_loss": 2.4 - 0.02 * alpha},
        "log_history": history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics))
    print("trained", cfg)
elif args[:2] == ["eval", "run"]:
    run = Path(args[2])
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    seed, alpha = cfg["seed"], alpha_of(cfg)
    ev = run / "eval"
    (ev / "generations").mkdir(parents=True, exist_ok=True)
    heldout = [2 + 0.01 * i - 0.02 * alpha + 0.001 * seed for i in range(8)]
    loss = {
        "train": {
            "loss": 1.5 - 0.01 * alpha,
            "examples": [{"index": i, "loss": 1.5 - 0.01 * alpha} for i in range(4)],
        },
        "sharegpt:heldout": {
            "loss": sum(heldout) / 8,
            "examples": [{"index": i, "loss": x} for i, x in enumerate(heldout)],
        },
    }
    (ev / "loss.json").write_text(json.dumps(loss))
    items = [{"rougeL_f": 0.2 + 0.01 * i + 0.005 * alpha} for i in range(4)]
    mem = {
        "scores": {
            "rougeL_f": sum(x["rougeL_f"] for x in items) / 4,
            "bleu_corpus": 0.05 + 0.002 * alpha,
            "items": items,
        },
        "shuffled_baseline": {"rougeL_f": 0.1, "bleu_corpus": 0.01},
    }
    (ev / "memorization.json").write_text(json.dumps(mem))
    answers = [" ".join(["w"] * (10 + i + int(alpha) + seed)) for i in range(6)]
    with (ev / "generations" / "heldout_prompts.jsonl").open("w") as f:
        for a in answers:
            f.write(json.dumps({"prompt": "p", "response": a}) + "\n")
    n = [len(a.split()) for a in answers]
    lengths = {
        "words": {"mean_length": sum(n) / len(n), "rep_2": 0.5, "diversity": 0.1, "log_diversity": 1.2},
        "tokens": {"mean_length": 2.0 * sum(n) / len(n)},
    }
    (ev / "lengths.json").write_text(json.dumps(lengths))
    (ev / "summary.json").write_text(json.dumps({"headline": {}}))
    print("evaluated", run)
else:
    sys.exit(f"fake_noisyft: unexpected arguments {args}")
