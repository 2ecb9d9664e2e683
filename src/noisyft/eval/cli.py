"""`noisyft eval ...`: the command-line side of :mod:`noisyft.eval` (heavy imports inside the commands).

noisyft eval run outputs/neftune-...               # default analyses on a trained run -> <run>/eval/
noisyft eval run smollm2 --analyses all            # a bare model, every analysis
noisyft eval report outputs/plain-*/eval outputs/neftune-*/eval
noisyft eval judge A.jsonl B.jsonl --judge-model gpt-4o-mini --base-url https://api.openai.com/v1
noisyft eval lm-eval outputs/neftune-.../model --tasks arc_challenge,hellaswag --limit 100
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .config import EvalConfig


def add_eval_parser(sub: Any) -> None:
    from noisyft.cli import add_config_arguments

    ev = sub.add_parser(
        "eval",
        help="evaluate models: noise-free loss, memorization, lengths/diversity, GSM8K, curvature, judge, report",
        description="The NEFTune and Fisher-penalty papers' analyses. Every analysis writes JSON (and JSONL of "
        "generations with their decoding settings) so reports render from files alone.",
    )
    evsub = ev.add_subparsers(dest="eval_command", metavar="ANALYSIS")
    run = evsub.add_parser(
        "run",
        help="the default analyses on one model or run folder",
        description="Noise-free loss (train, held-out, GSM8K), memorization (ROUGE-L/BLEU of greedy answers to "
        "training prompts), lengths and diversity of greedy answers to held-out prompts, GSM8K accuracy; "
        "with --analyses also the length ablations and the curvature table.",
    )
    add_config_arguments(run, EvalConfig, positional="target")

    rep = evsub.add_parser("report", help="a comparison table (markdown) from eval folders")
    rep.add_argument("folders", nargs="+", help="eval folders (or run folders holding eval/)")
    rep.add_argument("--output", help="also write the table to this file")

    judge = evsub.add_parser(
        "judge",
        help="pairwise LLM judge of two answer files (AlpacaEval-style, both orders)",
        description="Judge answers A against answers B (JSONL with prompt/response, e.g. generations/*.jsonl) "
        "with an OpenAI-compatible chat endpoint or a local HF model. The API key is read from the environment "
        "variable named by --api-key-env and is never written anywhere.",
    )
    judge.add_argument("answers_a")
    judge.add_argument("answers_b")
    judge.add_argument("--judge-model", required=True, help="model name at the endpoint, or a local model")
    judge.add_argument("--backend", default="openai", choices=["openai", "hf"])
    judge.add_argument("--base-url", default=None, help="OpenAI-compatible base URL (default: the SDK's)")
    judge.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    judge.add_argument("--max-concurrency", type=int, default=4)
    judge.add_argument("--max-retries", type=int, default=3)
    judge.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    judge.add_argument("--max-requests", type=int, default=None, help="hard cap on requests sent")
    judge.add_argument("--n-bootstrap", type=int, default=2000)
    judge.add_argument("--seed", type=int, default=0)
    judge.add_argument("--output-dir", required=True, help="where judgments.jsonl and summary.json go")
    judge.add_argument("--cache-dir", default=None, help="judgment cache (default: <noisyft cache>/judge)")

    lm = evsub.add_parser(
        "lm-eval",
        help="OpenLLM-Leaderboard tasks through lm-eval-harness (needs `pip install noisyft[lmeval]` and Hub)",
    )
    lm.add_argument("model", help="a model folder, 'smollm2', or a PEFT adapter folder")
    lm.add_argument("--tasks", default="mmlu,arc_challenge,hellaswag,truthfulqa_mc2")
    lm.add_argument("--limit", type=float, default=None, help="examples per task (or a fraction)")
    lm.add_argument("--num-fewshot", type=int, default=None)
    lm.add_argument("--batch-size", type=int, default=8)
    lm.add_argument("--device", default="cpu")
    lm.add_argument("--output", required=True, help="results JSON file")


def _fail(message: str, code: int = 1) -> int:
    print(f"noisyft eval: error: {message}", file=sys.stderr)
    return code


def run_eval_command(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if ns.eval_command is None:
        parser.parse_args(["eval", "--help"])
        return 2
    if ns.eval_command == "run":
        from noisyft.cli import resolve_train_config

        try:
            cfg = resolve_train_config(ns, EvalConfig, "eval run")
        except ValueError as exc:
            return _fail(str(exc), 2)
        from .recipe import EvalError, run_eval

        try:
            result = run_eval(cfg)
        except EvalError as exc:
            return _fail(str(exc))
        print()
        print(f"Results:  {result['output_dir']}")
        for key, value in result["summary"]["headline"].items():
            print(f"  {key:<28} {value:.4f}" if isinstance(value, float) else f"  {key:<28} {value}")
        return 0
    if ns.eval_command == "report":
        from .report import render_report

        try:
            table = render_report(ns.folders)
        except (OSError, ValueError) as exc:
            return _fail(str(exc))
        print(table)
        if ns.output:
            from noisyft._io import atomic_write_text

            atomic_write_text(ns.output, table + "\n")
        return 0
    if ns.eval_command == "judge":
        from .judge import JudgeConfig, judge_answer_files

        try:
            config = JudgeConfig(
                model=ns.judge_model,
                backend=ns.backend,
                base_url=ns.base_url,
                api_key_env=ns.api_key_env,
                max_concurrency=ns.max_concurrency,
                max_retries=ns.max_retries,
                timeout_s=ns.timeout,
                max_requests=ns.max_requests,
                n_bootstrap=ns.n_bootstrap,
                seed=ns.seed,
            )
            judge_model = None
            if ns.backend == "hf":
                from noisyft.models import load_model_and_tokenizer

                judge_model = load_model_and_tokenizer(ns.judge_model)
            summary = judge_answer_files(
                ns.answers_a,
                ns.answers_b,
                config,
                cache_dir=ns.cache_dir,
                output_dir=ns.output_dir,
                judge_model=judge_model,
            )
        except (OSError, ValueError) as exc:
            return _fail(str(exc))
        _print_judge(summary)
        return 0
    if ns.eval_command == "lm-eval":
        from .capability import run_lm_eval

        try:
            limit = ns.limit if ns.limit is None or ns.limit < 1 else int(ns.limit)
            result = run_lm_eval(
                ns.model,
                [t for t in ns.tasks.split(",") if t],
                limit=limit,
                batch_size=ns.batch_size,
                num_fewshot=ns.num_fewshot,
                device=ns.device,
                output_path=ns.output,
            )
        except (ImportError, OSError, ValueError) as exc:
            return _fail(str(exc))
        print(f"wrote {os.path.abspath(ns.output)} ({len(result.get('results', {}))} tasks)")
        return 0
    return _fail(f"unknown eval command {ns.eval_command}", 2)


def _print_judge(summary: dict) -> None:
    for key in ("win_rate", "win_rate_ties_half"):
        r = summary[key]
        value = "n/a" if r["value"] is None else f"{r['value']:.3f}"
        print(f"{key:<20} {value}  [{r['ci_low']}, {r['ci_high']}]  {r['formula']}")
    print(
        f"n={summary['n']} valid pairs of {summary['n_pairs']}; "
        + ", ".join(f"{k}={v}" for k, v in summary["counts"].items())
    )
    req = summary["requests"]
    print(f"requests: {req['sent']} sent, {req['cache_hits']} from cache, {req['retries']} retries")
