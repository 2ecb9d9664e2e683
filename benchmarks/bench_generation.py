"""Generation throughput: noisyft's batched generate_responses against a plain one-prompt-at-a-time loop.

    .venv/bin/python benchmarks/bench_generation.py --threads 1     # the committed result: SmolLM2-135M,
                                                                    # 16 prompts, 128 new tokens, batch 16, 2 rounds
    .venv/bin/python benchmarks/bench_generation.py --batch-size 8 --max-new-tokens 64 --threads 1

--threads 1 because the 2-core CPU here is shared with other processes: two OpenMP threads that wait for each
other on a busy machine ran 3-4x slower than one. Prefill (the prompt's forward pass, ~100 tokens per prompt)
costs both paths the same, so the speedup grows with --max-new-tokens (about 2.7x at 64 new tokens, batch 8).

Both paths answer the same ShareGPT training prompts (first user turns, rendered with the model's chat template,
at most --max-prompt-tokens tokens) greedily, in the same process, alternating which path goes first in each
round so that machine noise (other processes on a shared CPU) hits both alike. Throughput = new tokens actually
generated / wall time, where a new token is one up to and including the end token (tokens generated after an
answer ended, which batching pads away, do not count). Greedy answers of the two paths may differ through
numerics only (padded batches sum in another order); the token counts and the number of identical answers are
reported so the comparison can be judged. Reports the median tokens/s per path over rounds and their ratio.

Results go to benchmarks/results/generation-<device>-smollm2.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def load_prompts(tokenizer, n: int, max_prompt_tokens: int) -> tuple[list[str], int]:
    """The first user turn of the first ShareGPT training conversations whose prompt fits; (prompts, skipped)."""
    from noisyft.data import load_conversations
    from noisyft.embedded_data import sharegpt_split
    from noisyft.eval.generation import format_prompt

    conversations, _ = load_conversations(
        sharegpt_split("train"), limit=max(4 * n, 64), skip_bad_records=True
    )
    prompts, skipped = [], 0
    for conversation in conversations:
        text = conversation[0]["content"]
        if (
            len(tokenizer(format_prompt(tokenizer, text), add_special_tokens=False)["input_ids"])
            > max_prompt_tokens
        ):
            skipped += 1
            continue
        prompts.append(text)
        if len(prompts) == n:
            return prompts, skipped
    raise SystemExit(
        f"only {len(prompts)} of the first {len(conversations)} prompts fit in {max_prompt_tokens} tokens"
    )


def plain_loop(model, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[list[str], int]:
    """The baseline: one `generate` call per prompt, no padding; (responses, new tokens)."""
    from noisyft.eval.generation import format_prompt

    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    responses, total = [], 0
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False, return_tensors="pt")
            out = model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            new = out[0, ids["input_ids"].shape[1] :].tolist()
            n = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
            total += n
            responses.append(tokenizer.decode(new[:n], skip_special_tokens=True).strip())
    return responses, total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="'smollm2' (embedded) or a model folder")
    parser.add_argument("--prompts", type=int, default=16, help="number of ShareGPT prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=256, help="skip longer prompts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (each runs both paths)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="results JSON path")
    args = parser.parse_args(argv)

    from noisyft._io import atomic_write_json
    from noisyft.eval.generation import GenerationSettings, generate_responses
    from noisyft.models import load_model_and_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(args.model, dtype="float32")
    model.to(device).eval()
    prompts, skipped = load_prompts(tokenizer, args.prompts, args.max_prompt_tokens)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)

    def batched():
        records = generate_responses(model, tokenizer, prompts, settings, progress=False)
        return [r["response"] for r in records], sum(r["new_tokens"] for r in records)

    paths = {
        "batched": batched,
        "plain_loop": lambda: plain_loop(model, tokenizer, prompts, args.max_new_tokens),
    }
    # warm-up (allocator, kernels) on two prompts, untimed
    generate_responses(model, tokenizer, prompts[:2], GenerationSettings(max_new_tokens=4), progress=False)
    plain_loop(model, tokenizer, prompts[:1], 4)

    runs: dict[str, list[dict]] = {name: [] for name in paths}
    outputs: dict[str, list[str]] = {}
    for r in range(args.rounds):
        order = list(paths) if r % 2 == 0 else list(reversed(paths))
        for name in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            responses, tokens = paths[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            runs[name].append(
                {"round": r, "seconds": seconds, "new_tokens": tokens, "tokens_per_s": tokens / seconds}
            )
            outputs[name] = responses
            print(
                f"round {r + 1}/{args.rounds} {name:10s} {tokens:5d} tokens {seconds:7.1f}s {tokens / seconds:7.1f} tok/s",
                file=sys.stderr,
            )

    median = {name: statistics.median(x["tokens_per_s"] for x in rows) for name, rows in runs.items()}
    per_round = [
        b["tokens_per_s"] / p["tokens_per_s"]
        for b, p in zip(runs["batched"], runs["plain_loop"], strict=True)
    ]
    same = sum(a == b for a, b in zip(outputs["batched"], outputs["plain_loop"], strict=True))
    results = {
        "benchmark": "generation throughput: generate_responses (batched, left-padded) vs one prompt at a time",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_generation.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_at_end": list(os.getloadavg()),
        },
        "model": args.model,
        "dtype": str(model.dtype).removeprefix("torch."),
        "attention": getattr(model.config, "_attn_implementation", None),
        "settings": {
            "prompts": len(prompts),
            "prompts_skipped_too_long": skipped,
            "max_prompt_tokens": args.max_prompt_tokens,
            "rounds": args.rounds,
            "decoding": settings.to_dict(),
        },
        "tokens_per_s_median": median,
        "speedup_batched_over_plain": median["batched"] / median["plain_loop"],
        "speedup_per_round": per_round,
        "identical_answers": f"{same}/{len(prompts)}",
        "rounds": runs,
    }
    out = Path(args.out) if args.out else HERE / "results" / f"generation-{device.type}-smollm2.json"
    atomic_write_json(out, results)
    print(
        f"batched {median['batched']:.1f} tok/s, plain loop {median['plain_loop']:.1f} tok/s, "
        f"x{results['speedup_batched_over_plain']:.2f}; identical answers {same}/{len(prompts)} -> {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
