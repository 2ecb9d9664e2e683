"""The curvature analysis on the embedded SmolLM2: MC noise gap vs a^2/6 Tr(H_X) vs a^2/6 Tr(F_X).

Picks training examples of the embedded ShareGPT split (tokenized as `noisyft train` does), runs
`noisyft.eval.curvature.curvature_report` in float64 and writes the table as JSON.

    .venv/bin/python benchmarks/bench_curvature.py --indices 56,1 --alphas 0.5,1,5 \\
        --mc-samples 40 --hutchinson-samples 12 --fisher-samples 4

Results go to benchmarks/results/curvature-cpu-smollm2.json (takes ~10-20 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--indices", default="56,1", help="example indices among the first 200 training examples")
    p.add_argument("--alphas", default="0.5,1,5")
    p.add_argument("--mc-samples", type=int, default=40)
    p.add_argument("--hutchinson-samples", type=int, default=12)
    p.add_argument("--fisher-samples", type=int, default=4)
    p.add_argument("--max-batch-rows", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "curvature-cpu-smollm2.json"))
    args = p.parse_args(argv)

    from noisyft.data import build_sft_dataset
    from noisyft.eval.curvature import batch_from_dataset, curvature_report
    from noisyft.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2")
    ds, _ = build_sft_dataset("sharegpt", tok, max_length=512, skip_bad_records=True, limit=200)
    idx = [int(i) for i in args.indices.split(",")]
    sub = ds.select(idx)
    batch = batch_from_dataset(sub, len(idx), tok.pad_token_id)
    t0 = time.time()
    result = curvature_report(
        model,
        batch,
        alphas=[float(a) for a in args.alphas.split(",")],
        mc_samples=args.mc_samples,
        hutchinson_samples=args.hutchinson_samples,
        fisher_samples=args.fisher_samples,
        seed=args.seed,
        max_batch_rows=args.max_batch_rows,
    )
    result["elapsed_s"] = round(time.time() - t0, 1)
    result["examples"] = {
        "source": "sharegpt train split, first 200 examples, max_length 512",
        "indices": idx,
    }
    result["command"] = "python benchmarks/bench_curvature.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    result["when"] = datetime.now().isoformat(timespec="seconds")
    result["torch_threads"] = torch.get_num_threads()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    for row in result["table"]:
        print(
            {k: row[k] for k in ("alpha", "mc_gap", "mc_gap_se", "second_order", "second_order_se", "fisher")}
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
