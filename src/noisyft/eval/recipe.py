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

import dataclasses
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from noisyft._io import atomic_write_json
from noisyft._meta import versions
from noisyft.config import EMBEDDED_DATA, TrainConfig, migrate_legacy, skip_bad_records_default
from noisyft.eval.config import EvalConfig
from noisyft.settings import SettingsError, build, load_yaml, to_dict

logger = logging.getLogger(__name__)


class EvalError(RuntimeError):
    """A problem with the evaluation's inputs, reported as one line by the CLI."""


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """A `noisyft train` run folder's settings, read through the settings layer (a folder written before the
    method sections existed is migrated; one that cannot be read is refused with what to do)."""
    path = Path(run_dir) / "config.yaml"
    try:
        return build(TrainConfig, migrate_legacy(load_yaml(path), str(path)), where=str(path))
    except SettingsError as exc:
        raise EvalError(
            f"{exc} (this run's config.yaml does not read as `noisyft train` settings; fix it, or evaluate its "
            f"model folder directly: noisyft eval run {Path(run_dir) / 'model'} --train-data ...)"
        ) from None


def resolve_target(cfg: EvalConfig) -> dict[str, Any]:
    """Model path and training-data settings: from a run folder's settings, else from the flags/defaults."""
    target = Path(cfg.target)
    run: TrainConfig | None = None
    if (target / "config.yaml").is_file():
        if not (target / "model").is_dir():
            raise EvalError(f"{target} looks like a run folder but has no model/ (did the run finish?)")
        from noisyft.run_folder import RunFolderError, check_run_folder

        try:
            check_run_folder(target)
        except RunFolderError as exc:
            raise EvalError(str(exc)) from None
        run = read_run_config(target)
        if run.task != "sft":  # its data are preference records, not instruction data the analyses can read
            raise EvalError(
                f"{target} is a --task {run.task} run; eval run reads a run's instruction data, so evaluate its "
                f"model folder instead: noisyft eval run {target / 'model'} --train-data FILE"
            )
        model = str(target / "model")
    elif target.is_dir() and (target / "model").is_dir():
        raise EvalError(f"{target} has a model/ but no config.yaml: pass the model folder {target / 'model'}")
    else:
        model = cfg.target
    base = run or TrainConfig(method="none", data=EMBEDDED_DATA)
    train_data = cfg.train_data or base.data
    explicit = cfg.train_max_examples is not None
    return {
        "run_dir": str(target) if run else None,
        "model": model,
        "method": run.method if run else None,
        "train_data": train_data,
        # None means every record, as in training
        "train_max_examples": cfg.train_max_examples if explicit else base.max_examples,
        "template": cfg.template or base.template,
        "max_length": cfg.max_length or base.max_length,
        "data_format": base.data_format,
        "skip_bad_records": (
            base.skip_bad_records
            if base.skip_bad_records is not None
            else skip_bad_records_default(train_data)
        ),
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


@dataclasses.dataclass
class EvalContext:
    """What every analysis reads: the settings, the target, the loaded model, the results folder."""

    cfg: EvalConfig
    info: dict[str, Any]
    model: Any
    tokenizer: Any
    out: Path
    settings: Any  # GenerationSettings of the greedy answers
    headline: dict[str, Any]
    _prompts: tuple | None = None

    @property
    def fit(self) -> dict[str, Any]:
        return {
            "tokenizer": self.tokenizer,
            "template": self.info["template"],
            "max_prompt_tokens": self.info["max_length"],
        }

    @property
    def meta(self) -> dict[str, Any]:
        return {"model": self.info["model"], "run": self.info["run_dir"]}

    def heldout_prompts(self) -> tuple[list[Any], dict[str, int]]:
        """The length/diversity prompts, loaded once for the lengths and ablation analyses."""
        if self._prompts is None:
            source = self.cfg.prompts_data
            prompts, _, counts = _first_turn_pairs(
                source, self.cfg.num_prompts, skip_bad_records_default(source), **self.fit
            )
            self._prompts = (prompts, counts)
        return self._prompts

    def generations(self, name: str, records: list[dict], settings: Any, **extra: Any) -> None:
        from noisyft.eval.generation import write_generations

        write_generations(self.out / "generations" / f"{name}.jsonl", records, settings, **self.meta, **extra)


def _loss(ctx: EvalContext) -> dict[str, Any]:
    from noisyft.eval.loss import loss_report

    info, cfg = ctx.info, ctx.cfg
    kw = dict(template=info["template"], max_length=info["max_length"], batch_size=cfg.batch_size)
    result = loss_report(
        ctx.model,
        ctx.tokenizer,
        {"train": info["train_data"]},
        max_examples=info["train_max_examples"],
        skip_bad_records=info["skip_bad_records"],
        **kw,
    )
    heldout = {name: name for name in cfg.heldout}
    if heldout:
        result.update(
            loss_report(ctx.model, ctx.tokenizer, heldout, max_examples=cfg.heldout_max_examples, **kw)
        )
    for name, r in result.items():
        ctx.headline[f"loss/{name}"] = r["loss"]
    return result


def _memorization(ctx: EvalContext) -> dict[str, Any]:
    from noisyft.eval.generation import generate_responses
    from noisyft.eval.memorization import memorization_scores

    info = ctx.info
    prompts, references, counts = _first_turn_pairs(
        info["train_data"], ctx.cfg.num_prompts, info["skip_bad_records"], **ctx.fit
    )
    records = generate_responses(ctx.model, ctx.tokenizer, prompts, ctx.settings)
    for rec, ref in zip(records, references, strict=True):
        rec["reference"] = ref
    ctx.generations("train_prompts", records, ctx.settings)
    answers = [r["response"] for r in records]
    shuffled = references[1:] + references[:1]  # every answer against another prompt's response
    result = {
        "source": info["train_data"],
        "n_prompts": len(records),
        "prompts": counts,
        "scores": memorization_scores(answers, references),
        "shuffled_baseline": memorization_scores(answers, shuffled) if len(records) > 1 else None,
        "decoding": ctx.settings.to_dict(),
    }
    ctx.headline["rougeL_f"] = result["scores"]["rougeL_f"]
    ctx.headline["bleu"] = result["scores"]["bleu_corpus"]
    return result


def _lengths(ctx: EvalContext) -> dict[str, Any]:
    from noisyft.eval.generation import generate_responses

    prompts, counts = ctx.heldout_prompts()
    records = generate_responses(ctx.model, ctx.tokenizer, prompts, ctx.settings)
    ctx.generations("heldout_prompts", records, ctx.settings)
    result = {
        "source": ctx.cfg.prompts_data,
        "prompts": counts,
        "decoding": ctx.settings.to_dict(),
        "finish_reasons": dict(Counter(r["finish_reason"] for r in records)),
        **_length_stats([r["response"] for r in records], ctx.tokenizer),
    }
    ctx.headline["mean_length_words"] = result["words"]["mean_length"]
    ctx.headline["rep_2"] = result["words"]["rep_2"]
    ctx.headline["log_diversity"] = result["words"]["log_diversity"]
    return result


def _ablations(ctx: EvalContext) -> dict[str, Any]:
    from noisyft.eval.generation import ablation_settings, length_ablations

    cfg = ctx.cfg
    prompts, _ = ctx.heldout_prompts()
    # the three runs share one budget, large enough for the EOS-blocked run, so they compare
    budget = max(cfg.max_new_tokens, cfg.min_new_tokens)
    base = dataclasses.replace(ctx.settings, max_new_tokens=budget)
    runs = ablation_settings(base, min_new_tokens=cfg.min_new_tokens)
    outputs = length_ablations(ctx.model, ctx.tokenizer, prompts, base, min_new_tokens=cfg.min_new_tokens)
    result: dict[str, Any] = {"source": cfg.prompts_data, "max_new_tokens": budget}
    for name, records in outputs.items():
        ctx.generations(f"ablation_{name}", records, runs[name])
        result[name] = {
            "decoding": runs[name].to_dict(),
            "finish_reasons": dict(Counter(r["finish_reason"] for r in records)),
            **_length_stats([r["response"] for r in records], ctx.tokenizer),
        }
        ctx.headline[f"mean_length_words/{name}"] = result[name]["words"]["mean_length"]
    return result


def _gsm8k(ctx: EvalContext) -> dict[str, Any]:
    from noisyft.eval.capability import gsm8k_accuracy

    gs = dataclasses.replace(ctx.settings, max_new_tokens=ctx.cfg.gsm8k_max_new_tokens)
    result, records = gsm8k_accuracy(ctx.model, ctx.tokenizer, limit=ctx.cfg.gsm8k_limit, settings=gs)
    ctx.generations("gsm8k", records, gs, task="gsm8k")
    ctx.headline["gsm8k_accuracy"] = result["accuracy"]
    return result


def _curvature(ctx: EvalContext) -> dict[str, Any]:
    from noisyft.data import build_sft_dataset
    from noisyft.eval.curvature import batch_from_dataset, curvature_report
    from noisyft.models import pad_token_id

    cfg, info = ctx.cfg, ctx.info
    dataset, _ = build_sft_dataset(
        info["train_data"],
        ctx.tokenizer,
        template=info["template"],
        max_length=info["max_length"],
        skip_bad_records=info["skip_bad_records"],
        limit=cfg.curvature_examples,
    )
    batch = batch_from_dataset(dataset, cfg.curvature_examples, pad_token_id(ctx.tokenizer))
    return curvature_report(
        ctx.model,
        batch,
        alphas=cfg.curvature_alphas,
        mc_samples=cfg.curvature_mc_samples,
        hutchinson_samples=cfg.curvature_hutchinson_samples,
        fisher_samples=cfg.curvature_fisher_samples,
        seed=cfg.seed,
    )


# name -> the analysis; each writes <name>.json (and generations/) and fills its headline numbers
ANALYSES: dict[str, Callable[[EvalContext], dict[str, Any]]] = {
    "loss": _loss,
    "memorization": _memorization,
    "lengths": _lengths,
    "ablations": _ablations,
    "gsm8k": _gsm8k,
    "curvature": _curvature,
}


def _prepare_output(cfg: EvalConfig, out: Path) -> None:
    """A results folder holds one evaluation: refused when it has results, replaced whole with ``overwrite``."""
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise EvalError(f"{out} already holds results; pass --overwrite or another --output-dir")
        shutil.rmtree(out)


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    import torch

    from noisyft.eval.generation import GenerationSettings
    from noisyft.models import load_model_and_tokenizer

    info = resolve_target(cfg)
    out = _default_output(cfg, info)
    _prepare_output(cfg, out)
    started = time.time()
    try:
        model, tokenizer = load_model_and_tokenizer(
            info["model"], dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise EvalError(f"could not load model {info['model']!r}: {exc}") from exc
    model.eval()
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    settings = GenerationSettings(
        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed, template=info["template"]
    )
    summary: dict[str, Any] = {
        "target": cfg.target,
        **info,
        "config": to_dict(cfg),
        "started": datetime.now().isoformat(timespec="seconds"),
        "files": {},
        "headline": {},
        "wall_time_s": {},
    }
    ctx = EvalContext(cfg, info, model, tokenizer, out, settings, summary["headline"])
    for name in cfg.analyses:
        t0 = time.time()
        try:
            result = ANALYSES[name](ctx)
        except (OSError, ValueError) as exc:
            raise EvalError(f"{name}: {exc}") from exc
        atomic_write_json(out / f"{name}.json", result)
        summary["wall_time_s"][name] = round(time.time() - t0, 2)
        summary["files"][name] = f"{name}.json"
        logger.info("%s: %.1f s -> %s", name, time.time() - t0, out / f"{name}.json")
    summary["total_wall_time_s"] = round(time.time() - started, 2)
    summary["versions"] = versions(("noisyft", "torch", "transformers", "trl", "rouge-score", "sacrebleu"))
    atomic_write_json(out / "summary.json", summary)
    return {"output_dir": str(out), "summary": summary}
