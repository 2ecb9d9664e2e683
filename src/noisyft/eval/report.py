"""A comparison table rendered from eval folders' JSON files alone (``noisyft eval report``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def _folder(path: str) -> Path:
    p = Path(path)
    if (p / "summary.json").is_file():
        return p
    if (p / "eval" / "summary.json").is_file():
        return p / "eval"
    raise ValueError(f"{path}: no summary.json (an eval folder, or a run folder holding eval/)")


def _row(folder: Path) -> dict[str, Any]:
    summary = _load(folder / "summary.json")
    row: dict[str, Any] = {"run": summary.get("method") or Path(summary.get("model", folder)).name}
    row["folder"] = str(folder)
    if (folder / "loss.json").is_file():
        for name, r in _load(folder / "loss.json").items():
            row[f"loss {name}"] = r["loss"]
    if (folder / "memorization.json").is_file():
        mem = _load(folder / "memorization.json")
        row["ROUGE-L"] = mem["scores"]["rougeL_f"]
        row["BLEU"] = mem["scores"]["bleu_corpus"]
        if mem.get("shuffled_baseline"):
            row["ROUGE-L shuffled"] = mem["shuffled_baseline"]["rougeL_f"]
    if (folder / "lengths.json").is_file():
        words = _load(folder / "lengths.json")["words"]
        row["length (words)"] = words["mean_length"]
        row["rep-2"] = words["rep_2"]
        row["diversity"] = words["diversity"]
        row["log-div"] = words["log_diversity"]
    if (folder / "ablations.json").is_file():
        abl = _load(folder / "ablations.json")
        for name in ("default", "long_instruction", "eos_blocked"):
            if name in abl:
                row[f"length {name}"] = abl[name]["words"]["mean_length"]
    if (folder / "curvature.json").is_file():
        for r in _load(folder / "curvature.json")["table"]:
            a = f"{r['alpha']:g}"
            row[f"MC gap a={a}"] = f"{r['mc_gap']:.3g} ± {r['mc_gap_se']:.2g}"
            row[f"a²/6·Tr(H) a={a}"] = f"{r['second_order']:.3g} ± {r['second_order_se']:.2g}"
            if r.get("fisher") is not None:
                row[f"a²/6·Tr(F) a={a}"] = f"{r['fisher']:.3g} ± {r['fisher_se']:.2g}"
    if (folder / "gsm8k.json").is_file():
        g = _load(folder / "gsm8k.json")
        row["GSM8K acc"] = f"{g['correct']}/{g['n']}"
    return row


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"
    return "" if value is None else str(value)


def render_report(folders: Sequence[str]) -> str:
    """A markdown table, one row per eval folder, one column per headline number any of them has."""
    rows = [_row(_folder(f)) for f in folders]
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key != "folder" and key not in columns:
                columns.append(key)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    lines.append("")
    lines += [f"- {row['run']}: {row['folder']}" for row in rows]
    return "\n".join(lines)
