"""`noisyft eval ...`: the papers' analyses (heavy imports inside the commands).

noisyft eval run outputs/neftune-...               # default analyses on a trained run -> <run>/eval/
noisyft eval run smollm2 --analyses all            # a bare model, every analysis
noisyft eval report outputs/plain-*/eval outputs/neftune-*/eval
noisyft eval judge A.jsonl B.jsonl --output-dir J --judge.model gpt-4o-mini --judge.base-url https://...
noisyft eval lm-eval outputs/neftune-.../model --tasks arc_challenge,hellaswag --limit 100 --output r.json
"""

from __future__ import annotations

import argparse
import os

from noisyft import _cli
from noisyft.eval.config import EvalConfig, JudgeRunConfig, LMEvalConfig, ReportConfig
from noisyft.settings import add_arguments

COMMANDS = {
    "run": (
        EvalConfig,
        "the default analyses on one model or run folder",
        "Noise-free loss (train, held-out, GSM8K), memorization (ROUGE-L/BLEU of greedy answers to training "
        "prompts), lengths and diversity of greedy answers to held-out prompts, GSM8K accuracy; with --analyses "
        "also the length ablations and the curvature table.",
    ),
    "report": (ReportConfig, "a comparison table (markdown) from eval folders", None),
    "judge": (
        JudgeRunConfig,
        "pairwise LLM judge of two answer files (AlpacaEval-style, both orders)",
        "Judge answers A against answers B (JSONL with prompt/response, e.g. generations/*.jsonl) with an "
        "OpenAI-compatible chat endpoint or a local HF model. The API key is read from the environment variable "
        "named by --judge.api-key-env and is never written anywhere.",
    ),
    "lm-eval": (
        LMEvalConfig,
        "OpenLLM-Leaderboard tasks through lm-eval-harness (needs `pip install noisyft[lmeval]` and the Hub)",
        None,
    ),
}


def add_parser(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="evaluate models: noise-free loss, memorization, lengths/diversity, GSM8K, curvature, judge, report",
        description="The NEFTune and Fisher-penalty papers' analyses. Every analysis writes JSON (and JSONL of "
        "generations with their decoding settings) so reports render from files alone.",
    )
    evsub = ev.add_subparsers(dest="eval_command", metavar="ANALYSIS")
    for name, (cls, help_text, description) in COMMANDS.items():
        add_arguments(evsub.add_parser(name, help=help_text, description=description or help_text), cls)


def run(ns: argparse.Namespace) -> int:
    if ns.eval_command is None:
        return _cli.fail("eval", "choose one of: " + ", ".join(COMMANDS), _cli.USAGE_ERROR)
    command = f"eval {ns.eval_command}"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _cli.fail(
            command, "runs in one process; start it without torchrun / accelerate launch", _cli.USAGE_ERROR
        )
    cls = COMMANDS[ns.eval_command][0]
    cfg, code = _cli.settings_or_exit(command, ns, cls)
    if cfg is None:
        return code
    _cli.setup_logging()
    body = {"run": _run, "report": _report, "judge": _judge, "lm-eval": _lm_eval}[ns.eval_command]
    return _cli.run_guarded(command, lambda: body(cfg), (OSError, ValueError, ImportError, RuntimeError))


def _run(cfg: EvalConfig) -> int:
    from noisyft.eval.recipe import run_eval

    result = run_eval(cfg)
    print()
    print(f"Results:  {result['output_dir']}")
    for key, value in result["summary"]["headline"].items():
        print(f"  {key:<28} {value:.4f}" if isinstance(value, float) else f"  {key:<28} {value}")
    return 0


def _report(cfg: ReportConfig) -> int:
    from noisyft._io import atomic_write_text
    from noisyft.eval.report import render_report

    table = render_report(cfg.folders)
    print(table)
    if cfg.output:
        atomic_write_text(cfg.output, table + "\n")
    return 0


def _judge(cfg: JudgeRunConfig) -> int:
    from noisyft.eval.judge import JudgeNoResultError, judge_answer_files

    judge_model = None
    if cfg.judge.backend == "hf":
        from noisyft.models import load_model_and_tokenizer

        judge_model = load_model_and_tokenizer(cfg.judge.model)
    try:
        summary = judge_answer_files(
            cfg.answers_a,
            cfg.answers_b,
            cfg.judge,
            cache_dir=cfg.cache_dir,
            output_dir=cfg.output_dir,
            judge_model=judge_model,
        )
    except JudgeNoResultError as exc:  # the results files are written; show them, then fail
        _print_judge(exc.summary)
        return _cli.fail("eval judge", exc)
    _print_judge(summary)
    return 0


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


def _lm_eval(cfg: LMEvalConfig) -> int:
    from noisyft.eval.capability import run_lm_eval

    result = run_lm_eval(
        cfg.model,
        cfg.tasks,
        limit=cfg.limit_value,
        batch_size=cfg.batch_size,
        num_fewshot=cfg.num_fewshot,
        device=cfg.device,
        output_path=cfg.output,
    )
    print(f"wrote {os.path.abspath(cfg.output)} ({len(result.get('results', {}))} tasks)")
    return 0
