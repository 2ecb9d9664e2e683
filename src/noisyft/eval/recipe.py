"""`noisyft eval run`: the default analyses on one model, every result a JSON file in one folder.

Folder layout (``<run>/eval`` for a `noisyft train` run folder)::

    summary.json          settings, model, versions, headline numbers, wall time per analysis (written last)
    loss.json             noise-free loss per set: train, each held-out set (per token, per example)
    memorization.json     ROUGE-L / BLEU of greedy answers to training prompts vs the training responses,
                          next to a shuffled-pairs baseline (answers vs responses of other prompts)
    lengths.json          text_stats of greedy answers to held-out prompts (words, tokens, paper_compat)
    ablations.json        the same for the long-answer instruction and for EOS blocked until min_new_tokens
    gsm8k.json            exact-match accuracy on the first gsm8k_limit GSM8K test questions
    curvature.json        MC noise gap vs a^2/6 Tr(H_X) vs a^2/6 Tr(F_X) per alpha
    generations/*.jsonl   every generated answer, each line with its decoding settings

Every file is written atomically; ``noisyft eval report`` renders a comparison from these files alone.
"""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from noisyft._io import atomic_write_json
from noisyft.eval.config import EvalConfig

logger = logging.getLogger(__name__)


class EvalError(RuntimeError):
    """A problem with the evaluation's inputs, reported as one line by the CLI."""


def resolve_target(cfg: EvalConfig) -> dict[str, Any]:
    """Model path and training-data settings: from a run folder's config.yaml, else from the flags/defaults."""
    target = Path(cfg.target)
    run: dict[str, Any] = {}
    if (target / "config.yaml").is_file() and (target / "model").is_dir():
        run = yaml.safe_load((target / "config.yaml").read_text(encoding="utf-8")) or {}
        model = str(target / "model")
    elif (target / "config.yaml").is_file():
        raise EvalError(f"{target} looks like a run folder but has no model/ (did the run finish?)")
    else:
        model = cfg.target
    train_data = cfg.train_data or run.get("data") or "sharegpt"
    max_examples = cfg.train_max_examples or run.get("max_examples") or 48
    skip = run.get("skip_bad_records")
    return {
        "run_dir": str(target) if run else None,
        "model": model,
        "method": run.get("method"),
        "train_data": train_data,
        "train_max_examples": max_examples,
        "template": cfg.template or run.get("template") or "auto",
        "max_length": cfg.max_length or run.get("max_length") or 512,
        "data_format": run.get("data_format", "auto"),
        "skip_bad_records": skip if skip is not None else None,
    }


def _default_output(cfg: EvalConfig, info: dict[str, Any]) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if info["run_dir"]:
        return Path(info["run_dir"]) / "eval"
    name = Path(cfg.target).name or "model"
    return Path("outputs") / f"eval-{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _first_turn_pairs(
    source: str, limit: int, skip_bad: bool, *, tokenizer: Any, template: str, max_prompt_tokens: int
) -> tuple[list[Any], list[str], dict[str, int]]:
    """The first ``limit`` (prompt, first reply) pairs of ``source`` whose prompt fits ``max_prompt_tokens``.

    A prompt is the conversation up to its first assistant turn (a lone user turn travels as its text, so answer
    files read as instruction -> response). Longer prompts are skipped and counted (training truncates or drops
    them too, and generating after thousands of prompt tokens is what makes CPU evaluation slow).
    """
    from noisyft.data import load_conversations
    from noisyft.eval.generation import format_prompt

    conversations, _ = load_conversations(source, skip_bad_records=skip_bad, limit=limit * 4)
    prompts, replies = [], []
    counts = {"read": 0, "skipped_long_prompt": 0}
    for conv in conversations:
        if len(prompts) == limit:
            break
        counts["read"] += 1
        first = next(i for i, turn in enumerate(conv) if turn["role"] == "assistant")
        prefix = conv[:first]
        single = len(prefix) == 1 and prefix[0]["role"] == "user" and not prefix[0].get("input")
        prompt = prefix[0]["content"] if single else prefix
        if len(tokenizer(format_prompt(tokenizer, prompt, template))["input_ids"]) > max_prompt_tokens:
            counts["skipped_long_prompt"] += 1
            continue
        prompts.append(prompt)
        replies.append(conv[first]["content"])
    return prompts, replies, counts


def _length_stats(texts: list[str], tokenizer: Any) -> dict[str, Any]:
    from noisyft.eval.text_stats import text_stats

    return {
        "words": text_stats(texts),
        "words_paper_compat": text_stats(texts, paper_compat=True),
        "tokens": text_stats(texts, tokenizer=tokenizer),
    }


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    import torch

    from noisyft.eval.generation import (
        GenerationSettings,
        ablation_settings,
        generate_responses,
        write_generations,
    )
    from noisyft.models import load_model_and_tokenizer

    info = resolve_target(cfg)
    out = _default_output(cfg, info)
    if (out / "summary.json").exists() and not cfg.overwrite:
        raise EvalError(
            f"{out} already holds results (summary.json); pass --overwrite or another --output-dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    skip_bad = info["skip_bad_records"]
    if skip_bad is None:
        skip_bad = info["train_data"] == "sharegpt"

    started = time.time()
    try:
        model, tokenizer = load_model_and_tokenizer(
            info["model"], dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise EvalError(f"could not load model {info['model']!r}: {exc}") from exc
    model.eval()
    torch.manual_seed(cfg.seed)
    summary: dict[str, Any] = {
        "target": cfg.target,
        **info,
        "config": cfg.to_dict(),
        "started": datetime.now().isoformat(timespec="seconds"),
        "files": {},
        "headline": {},
        "wall_time_s": {},
    }
    meta = {"model": info["model"], "run": info["run_dir"]}
    settings = GenerationSettings(
        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed, template=info["template"]
    )
    head = summary["headline"]
    fit = {"tokenizer": tokenizer, "template": info["template"], "max_prompt_tokens": info["max_length"]}

    def done(name: str, t0: float, path: Path) -> None:
        summary["wall_time_s"][name] = round(time.time() - t0, 2)
        summary["files"][name] = str(path.relative_to(out))
        logger.info("%s: %.1f s -> %s", name, time.time() - t0, path)

    analyses = cfg.analysis_list
    try:
        if "loss" in analyses:
            from noisyft.eval.loss import loss_report

            t0 = time.time()
            kw = dict(template=info["template"], max_length=info["max_length"], batch_size=cfg.batch_size)
            result = loss_report(
                model,
                tokenizer,
                {"train": info["train_data"]},
                max_examples=info["train_max_examples"],
                skip_bad_records=skip_bad,
                **kw,
            )
            heldout = {name: name for name in cfg.heldout_list}
            if heldout:
                result.update(
                    loss_report(model, tokenizer, heldout, max_examples=cfg.heldout_max_examples, **kw)
                )
            atomic_write_json(out / "loss.json", result)
            for name, r in result.items():
                head[f"loss/{name}"] = r["loss"]
            done("loss", t0, out / "loss.json")

        if "memorization" in analyses:
            from noisyft.eval.memorization import memorization_scores

            t0 = time.time()
            prompts, references, counts = _first_turn_pairs(
                info["train_data"], cfg.num_prompts, skip_bad, **fit
            )
            records = generate_responses(model, tokenizer, prompts, settings)
            for rec, ref in zip(records, references, strict=True):
                rec["reference"] = ref
            write_generations(out / "generations" / "train_prompts.jsonl", records, settings, **meta)
            answers = [r["response"] for r in records]
            shuffled = references[1:] + references[:1]  # every answer against another prompt's response
            result = {
                "source": info["train_data"],
                "n_prompts": len(records),
                "prompts": counts,
                "scores": memorization_scores(answers, references),
                "shuffled_baseline": memorization_scores(answers, shuffled) if len(records) > 1 else None,
                "decoding": settings.to_dict(),
            }
            atomic_write_json(out / "memorization.json", result)
            head["rougeL_f"] = result["scores"]["rougeL_f"]
            head["bleu"] = result["scores"]["bleu_corpus"]
            done("memorization", t0, out / "memorization.json")

        prompts_cache: list[Any] | None = None
        if "lengths" in analyses or "ablations" in analyses:
            prompts_cache, _, prompt_counts = _first_turn_pairs(
                cfg.prompts_data, cfg.num_prompts, cfg.prompts_data.startswith("sharegpt"), **fit
            )

        if "lengths" in analyses:
            t0 = time.time()
            records = generate_responses(model, tokenizer, prompts_cache, settings)
            write_generations(out / "generations" / "heldout_prompts.jsonl", records, settings, **meta)
            result = {
                "source": cfg.prompts_data,
                "prompts": prompt_counts,
                "decoding": settings.to_dict(),
                "finish_reasons": _count(r["finish_reason"] for r in records),
                **_length_stats([r["response"] for r in records], tokenizer),
            }
            atomic_write_json(out / "lengths.json", result)
            head["mean_length_words"] = result["words"]["mean_length"]
            head["rep_2"] = result["words"]["rep_2"]
            head["log_diversity"] = result["words"]["log_diversity"]
            done("lengths", t0, out / "lengths.json")

        if "ablations" in analyses:
            import dataclasses

            t0 = time.time()
            # the three runs share one budget, large enough for the EOS-blocked run, so they compare
            budget = max(cfg.max_new_tokens, cfg.min_new_tokens)
            base = dataclasses.replace(settings, max_new_tokens=budget)
            result = {"source": cfg.prompts_data, "max_new_tokens": budget}
            for name, s in ablation_settings(base, min_new_tokens=cfg.min_new_tokens).items():
                records = generate_responses(model, tokenizer, prompts_cache, s)
                write_generations(out / "generations" / f"ablation_{name}.jsonl", records, s, **meta)
                result[name] = {
                    "decoding": s.to_dict(),
                    "finish_reasons": _count(r["finish_reason"] for r in records),
                    **_length_stats([r["response"] for r in records], tokenizer),
                }
                head[f"mean_length_words/{name}"] = result[name]["words"]["mean_length"]
            atomic_write_json(out / "ablations.json", result)
            done("ablations", t0, out / "ablations.json")

        if "gsm8k" in analyses:
            from noisyft.eval.capability import gsm8k_accuracy

            t0 = time.time()
            gs = GenerationSettings(
                max_new_tokens=cfg.gsm8k_max_new_tokens,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                template=info["template"],
            )
            result, records = gsm8k_accuracy(model, tokenizer, limit=cfg.gsm8k_limit, settings=gs)
            write_generations(out / "generations" / "gsm8k.jsonl", records, gs, task="gsm8k", **meta)
            atomic_write_json(out / "gsm8k.json", result)
            head["gsm8k_accuracy"] = result["accuracy"]
            done("gsm8k", t0, out / "gsm8k.json")

        if "curvature" in analyses:
            from noisyft.data import build_sft_dataset
            from noisyft.eval.curvature import batch_from_dataset, curvature_report

            t0 = time.time()
            dataset, _ = build_sft_dataset(
                info["train_data"],
                tokenizer,
                template=info["template"],
                max_length=info["max_length"],
                skip_bad_records=skip_bad,
                limit=cfg.curvature_examples,
            )
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            batch = batch_from_dataset(dataset, cfg.curvature_examples, pad)
            result = curvature_report(
                model,
                batch,
                alphas=cfg.alphas,
                mc_samples=cfg.curvature_mc_samples,
                hutchinson_samples=cfg.curvature_hutchinson_samples,
                fisher_samples=cfg.curvature_fisher_samples,
                seed=cfg.seed,
            )
            atomic_write_json(out / "curvature.json", result)
            done("curvature", t0, out / "curvature.json")
    except (OSError, ValueError) as exc:
        raise EvalError(str(exc)) from exc

    summary["total_wall_time_s"] = round(time.time() - started, 2)
    summary["versions"] = _versions()
    atomic_write_json(out / "summary.json", summary)
    return {"output_dir": str(out), "summary": summary}


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("noisyft", "torch", "transformers", "trl", "rouge-score", "sacrebleu"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out
