"""``noisyft experiment report DIR``: ``summary.json``, ``report.md`` and ``report.html`` from the trial folders.

``summary.json`` (read by other tools)::

    {"baseline": VARIANT | null, "experiment": NAME,
     "variants": {VARIANT: {"settings": {...}, "axes": {...}, "trials": [ids], "seeds": [..],
                            "metrics": {METRIC: {"mean": x, "std": x, "n": k,
                                                 "diff": {"estimate": x, "ci_low": x, "ci_high": x,
                                                          "level": 0.95, "n": pairs, "pairs": "units"|"seeds"}}}}},
     "trials": [{"id", "variant", "seed", "state", "error", "wall_s"}]}

``diff`` is the variant minus the baseline, paired (see :mod:`.stats`); absent for the baseline itself.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from noisyft._io import atomic_write_json, atomic_write_text

from .cells import _fmt, all_metrics, diff_cell, metric_cell
from .results import TrialResult, read_trials
from .stats import mean_std, paired_bootstrap, paired_pairs

logger = logging.getLogger(__name__)


class ReportError(ValueError):
    """The folder cannot be reported on (no experiment, no finished trial)."""


def _experiment_meta(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "experiment.yaml"
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _variant_order(meta: dict[str, Any], trials: list[TrialResult]) -> list[str]:
    order: list[str] = []
    for t in sorted(trials, key=lambda t: (t.record.get("order", 0), t.id)):
        if t.variant not in order:
            order.append(t.variant)
    baseline = meta.get("baseline")
    if baseline in order:
        order.remove(baseline)
        order.insert(0, baseline)
    return order


def build_summary(out_dir: str | Path, *, seed: int = 0) -> dict[str, Any]:
    """The summary of an experiment folder; raises ReportError when no trial has finished."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ReportError(f"{out_dir}: no such folder")
    meta = _experiment_meta(out_dir)
    trials = read_trials(out_dir)
    done = [t for t in trials if t.state == "complete"]
    if not done:
        what = f"{len(trials)} trial(s), none finished" if trials else "no trial folder under trials/"
        raise ReportError(f"{out_dir}: nothing to report yet ({what}); run `noisyft experiment run` first")
    baseline = meta.get("baseline")
    if baseline is not None and not any(t.variant == baseline for t in done):
        logger.warning("baseline %s has no finished trial; no paired differences", baseline)
        baseline = None
    variants: dict[str, Any] = {}
    for name in _variant_order(meta, done):
        mine = [t for t in done if t.variant == name]
        first = mine[0].record
        names = sorted({m for t in mine for m in t.metrics})
        metrics = {}
        for metric in names:
            entry = mean_std([t.metrics[metric] for t in mine if metric in t.metrics])
            if baseline is not None and name != baseline:
                entry["diff"] = _diff(metric, mine, [t for t in done if t.variant == baseline], seed)
            metrics[metric] = entry
        variants[name] = {
            "settings": first.get("settings", {}),
            "axes": first.get("params", {}),
            "group": first.get("group", name),
            "trials": [t.id for t in mine],
            "seeds": sorted(t.seed for t in mine),
            "metrics": metrics,
        }
    return {
        "experiment": meta.get("name"),
        "baseline": baseline,
        "variants": variants,
        "trials": [
            {
                "id": t.id,
                "variant": t.variant,
                "seed": t.seed,
                "state": t.state,
                "error": t.record.get("error"),
                "wall_s": t.record.get("wall_s"),
                "value": t.record.get("value"),
            }
            for t in trials
        ],
    }


def _diff(metric: str, mine: list[TrialResult], base: list[TrialResult], seed: int) -> dict[str, Any]:
    def by_seed(ts: list[TrialResult]) -> dict[int, tuple[float | None, list | None]]:
        return {t.seed: (t.metrics.get(metric), t.units.get(metric)) for t in ts if metric in t.metrics}

    xs, ys, how = paired_pairs(by_seed(mine), by_seed(base))
    result = paired_bootstrap(xs, ys, seed=seed)
    result["pairs"] = how
    return result


def render_markdown(summary: dict[str, Any]) -> str:
    variants = list(summary["variants"])
    metrics = all_metrics(summary)
    lines = [f"# Experiment {summary.get('experiment') or ''}".rstrip(), ""]
    lines += ["Mean ± std over seeds (n trials).", ""]
    lines += ["| metric | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for m in metrics:
        cells = [
            metric_cell(summary["variants"][v]["metrics"][m])
            if m in summary["variants"][v]["metrics"]
            else "–"
            for v in variants
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if summary.get("baseline"):
        others = [v for v in variants if v != summary["baseline"]]
        lines += [
            "",
            f"Paired difference against {summary['baseline']} (variant − baseline), 95% bootstrap interval.",
            "",
        ]
        lines += ["| metric | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        for m in metrics:
            cells = [diff_cell(summary["variants"][v]["metrics"].get(m, {}).get("diff")) for v in others]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "| trial | variant | seed | state | wall (s) | error |", "|---|---|---|---|---|---|"]
    for t in summary["trials"]:
        err = (t.get("error") or "").replace("|", "\\|")
        lines.append(
            f"| {t['id']} | {t['variant']} | {t['seed']} | {t['state']} | {_fmt(t.get('wall_s'))} | {err} |"
        )
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path) -> dict[str, Any]:
    """Write summary.json, report.md and report.html; return their paths, the figure/table ids and timing."""
    from .html import render_html

    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    summary = build_summary(out_dir)
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "report.md", render_markdown(summary))
    html, manifest = render_html(summary, read_trials(out_dir), _experiment_meta(out_dir))
    atomic_write_text(out_dir / "report.html", html)
    return {
        "summary": str(out_dir / "summary.json"),
        "markdown": str(out_dir / "report.md"),
        "html": str(out_dir / "report.html"),
        "figures": manifest["figures"],
        "tables": manifest["tables"],
        "seconds": time.perf_counter() - t0,
    }


def load_summary(out_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / "summary.json").read_text(encoding="utf-8"))
