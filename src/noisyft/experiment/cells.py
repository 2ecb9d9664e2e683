"""Table cells shared by the markdown and the HTML report: metric values, paired differences, metric order."""

from __future__ import annotations

from typing import Any


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def metric_cell(entry: dict[str, Any]) -> str:
    if entry.get("std") is None:
        return f"{_fmt(entry['mean'])} (n={entry['n']})"
    return f"{_fmt(entry['mean'])} ± {_fmt(entry['std'], 2)} (n={entry['n']})"


def diff_cell(diff: dict[str, Any] | None) -> str:
    if not diff or diff.get("estimate") is None:
        return "–"
    if diff.get("ci_low") is None:
        return f"{diff['estimate']:+.4g} (no interval: {diff['n']} pair)"
    return f"{diff['estimate']:+.4g} [{diff['ci_low']:+.4g}, {diff['ci_high']:+.4g}] ({diff['n']} {diff['pairs']})"


def all_metrics(summary: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for v in summary["variants"].values():
        for m in v["metrics"]:
            if m not in seen:
                seen.append(m)
    return sorted(seen)
