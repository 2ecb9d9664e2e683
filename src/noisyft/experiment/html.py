"""``report.html``: one self-contained page (figures as embedded PNG, no script, no network).

Figures, each present when the trials hold the data for it:

- ``fig-curves``: training curves from each trial's log history (loss, noise and Fisher statistics), the mean
  over seeds with a ± std band;
- ``fig-losses``: noise-free train and held-out losses per variant (NEFTune Fig. 4);
- ``fig-memorization``: ROUGE-L / BLEU of answers to training prompts beside the shuffled baseline (Fig. 5);
- ``fig-lengths``: histograms of answer lengths (words) per variant (with the Table 4 view as a table);
- ``fig-sweep``: a metric against each numeric grid axis or search parameter (Fig. 2);
- ``fig-judge``: judge win rates, when trials were judged.

Tables: ``tab-metrics`` (mean ± std), ``tab-diff`` (paired differences against the baseline), ``tab-lengths``
and ``tab-trials``.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

from .cells import all_metrics, diff_cell, metric_cell
from .results import TrialResult

CURVE_KEYS = ("loss", "grad_norm")
CURVE_PREFIXES = ("neftune/", "noisytune/", "fisher/")
MAX_CURVES = 6


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _colors(names: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _curve_keys(trials: list[TrialResult]) -> list[str]:
    keys: list[str] = []
    for t in trials:
        for h in t.history:
            for k, v in h.items():
                if (
                    isinstance(v, (int, float))
                    and (k in CURVE_KEYS or k.startswith(CURVE_PREFIXES))
                    and k not in keys
                ):
                    keys.append(k)
    return keys[:MAX_CURVES]


def _fig_curves(trials: list[TrialResult], order: list[str], colors: dict) -> str | None:
    import matplotlib.pyplot as plt
    import numpy as np

    keys = _curve_keys(trials)
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for name in order:
            per_step: dict[float, list[float]] = {}
            for t in trials:
                if t.variant != name:
                    continue
                for h in t.history:
                    if (
                        key in h
                        and "step" in h
                        and isinstance(h[key], (int, float))
                        and math.isfinite(h[key])
                    ):
                        per_step.setdefault(float(h["step"]), []).append(float(h[key]))
            if not per_step:
                continue
            steps = np.array(sorted(per_step))
            mean = np.array([np.mean(per_step[s]) for s in steps])
            std = np.array([np.std(per_step[s], ddof=1) if len(per_step[s]) > 1 else 0.0 for s in steps])
            ax.plot(steps, mean, color=colors[name], label=name, lw=1.5)
            ax.fill_between(steps, mean - std, mean + std, color=colors[name], alpha=0.2, lw=0)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _png(fig)


def _bars(summary: dict, metrics: list[str], order: list[str], colors: dict, title: str) -> str | None:
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = [m for m in metrics if any(m in summary["variants"][v]["metrics"] for v in order)]
    if not metrics:
        return None
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(metrics) * max(1, len(order)) / 2), 3.4))
    width = 0.8 / max(1, len(order))
    x = np.arange(len(metrics))
    for i, name in enumerate(order):
        vals = summary["variants"][name]["metrics"]
        means = [vals.get(m, {}).get("mean") or 0.0 for m in metrics]
        errs = [vals.get(m, {}).get("std") or 0.0 for m in metrics]
        ax.bar(
            x + (i - (len(order) - 1) / 2) * width,
            means,
            width,
            yerr=errs,
            capsize=3,
            color=colors[name],
            label=name,
        )
    ax.set_xticks(x, [m.split(".", 1)[1] for m in metrics], rotation=15, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _fig_lengths(trials: list[TrialResult], order: list[str], colors: dict) -> str | None:
    import matplotlib.pyplot as plt

    pooled = {n: [x for t in trials if t.variant == n for x in t.lengths] for n in order}
    pooled = {n: xs for n, xs in pooled.items() if xs}
    if not pooled:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    top = max(max(xs) for xs in pooled.values())
    bins = max(5, min(30, top + 1))
    for name, xs in pooled.items():
        ax.hist(xs, bins=bins, range=(0, top + 1), histtype="step", lw=1.5, color=colors[name], label=name)
    ax.set_xlabel("answer length (words), held-out prompts, all seeds")
    ax.set_ylabel("answers")
    ax.legend(fontsize=8)
    return _png(fig)


def _sweep_metric(summary: dict, meta: dict) -> str | None:
    wanted = (meta.get("search") or {}).get("metric") or meta.get("metric")
    names = all_metrics(summary)
    if wanted in names:
        return wanted
    heldout = [m for m in names if m.startswith("loss.") and m != "loss.train"]
    return (heldout or names or [None])[0]


def _fig_sweep(summary: dict, trials: list[TrialResult], meta: dict, colors: dict) -> str | None:
    import matplotlib.pyplot as plt

    metric = _sweep_metric(summary, meta)
    axes = sorted(
        {
            a
            for v in summary["variants"].values()
            for a, x in (v.get("axes") or {}).items()
            if isinstance(x, (int, float))
        }
    )
    if metric is None or not axes:
        return None
    fig, panels = plt.subplots(1, len(axes), figsize=(4.5 * len(axes), 3.2), squeeze=False)
    for ax, axis in zip(panels[0], axes, strict=True):
        groups: dict[str, list[tuple[float, float, float]]] = {}
        for v in summary["variants"].values():
            x, m = (v.get("axes") or {}).get(axis), v["metrics"].get(metric)
            if isinstance(x, (int, float)) and m and m.get("mean") is not None:
                groups.setdefault(v["group"], []).append((float(x), m["mean"], m.get("std") or 0.0))
        for group, pts in groups.items():
            pts.sort()
            single = all(
                len(summary["variants"][n]["trials"]) == 1
                for n, v in summary["variants"].items()
                if v["group"] == group
            )
            style = "o" if single and len(pts) > 8 else "o-"
            ax.errorbar(
                [p[0] for p in pts],
                [p[1] for p in pts],
                yerr=[p[2] for p in pts],
                fmt=style,
                capsize=3,
                label=group,
            )
        baseline = summary.get("baseline")
        if baseline and metric in summary["variants"][baseline]["metrics"]:
            ax.axhline(
                summary["variants"][baseline]["metrics"][metric]["mean"],
                color="grey",
                ls="--",
                label=baseline,
            )
        ax.set_xlabel(axis)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def _table(tid: str, header: list[str], rows: list[list[str]], caption: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{tid}"><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _tables(summary: dict, order: list[str]) -> dict[str, str]:
    variants = summary["variants"]
    metrics = all_metrics(summary)
    out = {}
    rows = [
        [m] + [metric_cell(variants[v]["metrics"][m]) if m in variants[v]["metrics"] else "–" for v in order]
        for m in metrics
    ]
    out["tab-metrics"] = _table(
        "tab-metrics", ["metric", *order], rows, "Every metric, mean ± std over seeds (n trials)"
    )
    base = summary.get("baseline")
    if base:
        others = [v for v in order if v != base]
        rows = [
            [m] + [diff_cell(variants[v]["metrics"].get(m, {}).get("diff")) for v in others] for m in metrics
        ]
        out["tab-diff"] = _table(
            "tab-diff", ["metric", *others], rows,
            f"Paired difference, variant − {base}: estimate [95% bootstrap interval] (pairs)",
        )  # fmt: skip
    lengths = [m for m in metrics if m.startswith("lengths.")]
    if lengths:
        rows = [
            [v]
            + [
                metric_cell(variants[v]["metrics"][m]) if m in variants[v]["metrics"] else "–"
                for m in lengths
            ]
            for v in order
        ]
        out["tab-lengths"] = _table(
            "tab-lengths",
            ["variant", *[m[8:] for m in lengths]],
            rows,
            "Length and diversity of answers to held-out prompts (Table 4 view)",
        )
    rows = [
        [
            t["id"],
            t["variant"],
            str(t["seed"]),
            t["state"],
            "–" if t.get("wall_s") is None else f"{t['wall_s']:.1f}",
            t.get("error") or "",
        ]
        for t in summary["trials"]
    ]
    out["tab-trials"] = _table(
        "tab-trials", ["trial", "variant", "seed", "state", "wall (s)", "error"], rows, "Trials"
    )
    return out


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.85em}td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left}
caption{text-align:left;font-weight:600;padding:.3em 0}figure{margin:1.5em 0}img{max-width:100%}
figcaption{font-size:.9em;color:#555}.scroll{overflow-x:auto}"""


def render_html(summary: dict[str, Any], trials: list[TrialResult], meta: dict[str, Any]) -> tuple[str, dict]:
    """The page and its manifest ``{"figures": [ids], "tables": [ids]}``."""
    import matplotlib

    matplotlib.use("Agg")
    done = [t for t in trials if t.state == "complete"]
    order = list(summary["variants"])
    colors = _colors(order)
    mem = [
        "memorization.rouge_l",
        "memorization.rouge_l_shuffled",
        "memorization.bleu",
        "memorization.bleu_shuffled",
    ]
    figures = {
        "fig-curves": (_fig_curves(done, order, colors), "Training curves: mean over seeds, band ± std"),
        "fig-losses": (
            _bars(
                summary,
                [m for m in all_metrics(summary) if m.startswith("loss.")],
                order,
                colors,
                "Noise-free loss",
            ),
            "Noise-free train and held-out loss per variant (NEFTune Fig. 4 view); bars: mean, whiskers: std",
        ),
        "fig-memorization": (
            _bars(summary, mem, order, colors, "Memorization"),
            "ROUGE-L / BLEU of answers to training prompts vs training responses, beside shuffled pairs (Fig. 5 view)",
        ),
        "fig-lengths": (_fig_lengths(done, order, colors), "Answer lengths on held-out prompts"),
        "fig-sweep": (
            _fig_sweep(summary, done, meta, colors),
            "Metric against each numeric grid axis / search parameter",
        ),
        "fig-judge": (_bars(summary, ["judge.win_rate"], order, colors, "Judge win rate"), "Judge win rate"),
    }
    tables = _tables(summary, order)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>noisyft experiment {html.escape(str(summary.get('experiment') or ''))}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Experiment {html.escape(str(summary.get('experiment') or ''))}</h1>",
        f"<p>{len(done)} finished trial(s) of {len(trials)}; baseline: {html.escape(str(summary.get('baseline')))}.</p>",
    ]
    shown = []
    for fid, (png, caption) in figures.items():
        if png is None:
            continue
        shown.append(fid)
        parts.append(
            f'<figure id="{fid}"><img alt="{html.escape(caption)}" src="data:image/png;base64,{png}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
        if fid == "fig-lengths" and "tab-lengths" in tables:
            parts.append(f"<div class='scroll'>{tables['tab-lengths']}</div>")
    for tid in ("tab-metrics", "tab-diff", "tab-trials"):
        if tid in tables:
            parts.append(f"<div class='scroll'>{tables[tid]}</div>")
    if "tab-lengths" in tables and "fig-lengths" not in shown:
        parts.append(f"<div class='scroll'>{tables['tab-lengths']}</div>")
    parts.append("</body></html>")
    return "\n".join(parts), {"figures": shown, "tables": list(tables)}
