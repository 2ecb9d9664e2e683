"""Read an experiment folder back: trial records, each trial's metrics and per-example values, curves.

Metric names follow the eval JSON files: ``loss.<set>`` (``loss.train``, ``loss.sharegpt:heldout``),
``memorization.rouge_l`` / ``memorization.bleu`` and their ``..._shuffled`` baselines,
``lengths.mean_length`` / ``lengths.rep_2`` / ``lengths.diversity`` / ``lengths.log_diversity`` (words) and
``lengths.mean_length_tokens``, ``ablations.<name>.mean_length``, ``gsm8k.accuracy``, and from the training run
``train.train_loss`` / ``train.eval_loss``.

Next to the scalar, a metric may carry its per-unit values (one per held-out example, training prompt or
generated answer, in the same order for every trial of an experiment), so differences can be paired on them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrialResult:
    """A finished trial as read from its folder."""

    id: str
    variant: str
    seed: int
    state: str
    record: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    units: dict[str, list[float | None]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # words per generated answer to held-out prompts


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _put(out: dict[str, float], name: str, value: Any) -> None:
    v = _num(value)
    if v is not None:
        out[name] = v


def _loss(ev: Path, metrics: dict, units: dict) -> None:
    for name, r in _load(ev / "loss.json").items():
        _put(metrics, f"loss.{name}", r.get("loss"))
        if r.get("examples"):
            units[f"loss.{name}"] = [_num(e.get("loss")) for e in r["examples"]]


def _memorization(ev: Path, metrics: dict, units: dict) -> None:
    mem = _load(ev / "memorization.json")
    scores = mem.get("scores") or {}
    _put(metrics, "memorization.rouge_l", scores.get("rougeL_f"))
    _put(metrics, "memorization.bleu", scores.get("bleu_corpus"))
    if scores.get("items"):
        units["memorization.rouge_l"] = [_num(i.get("rougeL_f")) for i in scores["items"]]
    shuffled = mem.get("shuffled_baseline") or {}
    _put(metrics, "memorization.rouge_l_shuffled", shuffled.get("rougeL_f"))
    _put(metrics, "memorization.bleu_shuffled", shuffled.get("bleu_corpus"))


def _lengths(ev: Path, metrics: dict, units: dict) -> list[int]:
    data = _load(ev / "lengths.json")
    words = data.get("words") or {}
    for key in ("mean_length", "rep_2", "rep_3", "rep_4", "diversity", "log_diversity"):
        _put(metrics, f"lengths.{key}", words.get(key))
    _put(metrics, "lengths.mean_length_tokens", (data.get("tokens") or {}).get("mean_length"))
    gen = ev / "generations" / "heldout_prompts.jsonl"
    counts: list[int] = []
    if gen.is_file():
        for line in gen.read_text(encoding="utf-8").splitlines():
            if line.strip():
                counts.append(len(str(json.loads(line).get("response", "")).split()))
        units["lengths.mean_length"] = [float(c) for c in counts]
    return counts


def _eval_metrics(ev: Path, result: TrialResult) -> None:
    if (ev / "loss.json").is_file():
        _loss(ev, result.metrics, result.units)
    if (ev / "memorization.json").is_file():
        _memorization(ev, result.metrics, result.units)
    if (ev / "lengths.json").is_file():
        result.lengths = _lengths(ev, result.metrics, result.units)
    if (ev / "ablations.json").is_file():
        for name, r in _load(ev / "ablations.json").items():
            if isinstance(r, dict) and "words" in r:
                _put(result.metrics, f"ablations.{name}.mean_length", r["words"].get("mean_length"))
    if (ev / "gsm8k.json").is_file():
        _put(result.metrics, "gsm8k.accuracy", _load(ev / "gsm8k.json").get("accuracy"))
    judge = ev / "judge" / "summary.json"
    if judge.is_file():
        _put(result.metrics, "judge.win_rate", (_load(judge).get("win_rate") or {}).get("value"))


def read_trial(trial_dir: Path) -> TrialResult | None:
    """A trial folder's record, metrics and log history (None when it has no trial.json)."""
    if not (trial_dir / "trial.json").is_file():
        return None
    record = _load(trial_dir / "trial.json")
    result = TrialResult(
        id=record["id"],
        variant=record["variant"],
        seed=int(record["seed"]),
        state=record["state"],
        record=record,
    )
    if result.state != "complete":
        return result
    run = trial_dir / "run"
    if (run / "metrics.json").is_file():
        train = _load(run / "metrics.json")
        _put(result.metrics, "train.train_loss", (train.get("train") or {}).get("train_loss"))
        _put(result.metrics, "train.eval_loss", (train.get("eval") or {}).get("eval_loss"))
        result.history = [h for h in train.get("log_history") or [] if isinstance(h, dict)]
    _eval_metrics(run / "eval", result)
    return result


def read_trials(out_dir: Path) -> list[TrialResult]:
    """Every trial folder of an experiment, sorted by id."""
    trials_dir = Path(out_dir) / "trials"
    if not trials_dir.is_dir():
        return []
    out = []
    for d in sorted(p for p in trials_dir.iterdir() if p.is_dir()):
        r = read_trial(d)
        if r is not None:
            out.append(r)
    return out


def trial_metrics(trial_dir: Path) -> dict[str, float]:
    """The scalar metrics of a finished trial folder (used by the runner for the Optuna objective)."""
    record = _load(trial_dir / "trial.json") if (trial_dir / "trial.json").is_file() else {}
    probe = TrialResult(id="", variant="", seed=0, state="complete", record=record)
    run = trial_dir / "run"
    if (run / "metrics.json").is_file():
        train = _load(run / "metrics.json")
        _put(probe.metrics, "train.train_loss", (train.get("train") or {}).get("train_loss"))
        _put(probe.metrics, "train.eval_loss", (train.get("eval") or {}).get("eval_loss"))
    _eval_metrics(run / "eval", probe)
    return probe.metrics
