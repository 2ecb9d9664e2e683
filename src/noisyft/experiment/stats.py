"""Statistics of an experiment: mean ± std over seeds, and paired differences against the baseline variant.

Pairing. A variant's trial with seed ``s`` is compared with the baseline's trial with the same seed (same data
order and initialisation). When a metric has per-unit values (the loss of each held-out example, the ROUGE-L of
each training prompt, the length of each answer, the same units in every trial), the pairs are the
(seed, unit) pairs ``d_{s,i} = x_{s,i}^{variant} - x_{s,i}^{baseline}``; otherwise they are the seeds,
``d_s = x_s^{variant} - x_s^{baseline}``.

The estimate is the difference of the means over the pairs, ``mean(x^variant) - mean(x^baseline) = mean(d)``,
and its confidence interval a bootstrap over the pairs (resampling pairs keeps each pair together), computed
by :func:`scipy.stats.bootstrap` with ``paired=True`` (BCa; the percentile interval where BCa is undefined).
Resampling (seed, unit) pairs treats them as independent, which ignores how units of one seed move together:
with few seeds read the interval as the spread over examples, not over training runs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

LEVEL = 0.95
N_RESAMPLES = 4000


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "n"}``: the sample standard deviation (ddof = 1), None for a single value."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = math.fsum(xs) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def _mean_diff(treated, base, axis=-1):
    return treated.mean(axis=axis) - base.mean(axis=axis)


def paired_bootstrap(
    treated: Sequence[float],
    base: Sequence[float],
    *,
    level: float = LEVEL,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    method: str = "BCa",
) -> dict[str, Any]:
    """Difference of means of paired samples with a bootstrap confidence interval.

    Returns ``{"estimate", "ci_low", "ci_high", "level", "n", "method"}``; the interval is None for fewer than two
    pairs, and ``[d, d]`` when every pair differs by the same ``d`` (no resample can differ).
    """
    import numpy as np

    t = np.asarray(treated, dtype=float)
    b = np.asarray(base, dtype=float)
    if t.shape != b.shape or t.ndim != 1:
        raise ValueError(f"paired samples need equal 1-d shapes, got {t.shape} and {b.shape}")
    n = int(t.size)
    out: dict[str, Any] = {
        "estimate": None,
        "ci_low": None,
        "ci_high": None,
        "level": level,
        "n": n,
        "method": None,
    }
    if n == 0:
        return out
    d = t - b
    out["estimate"] = float(t.mean() - b.mean())
    if n < 2:
        return out
    if np.all(d == d[0]):
        out.update(ci_low=float(d[0]), ci_high=float(d[0]), method="exact")
        return out
    from scipy import stats

    for how in (method, "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.bootstrap(
                (t, b),
                _mean_diff,
                paired=True,
                vectorized=True,
                confidence_level=level,
                n_resamples=n_resamples,
                method=how,
                rng=np.random.default_rng(seed),
            )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            out.update(ci_low=low, ci_high=high, method=how)
            return out
    return out


def paired_pairs(
    variant: dict[int, tuple[float | None, list | None]],
    baseline: dict[int, tuple[float | None, list | None]],
) -> tuple[list[float], list[float], str]:
    """Matched values of a variant and the baseline: ``{seed: (scalar, units)}`` each.

    Units are used when every matched seed has them with equal lengths on both sides, pairs with a missing
    value dropped; otherwise the seeds' scalars. Returns (variant values, baseline values, "units" | "seeds").
    """
    seeds = sorted(set(variant) & set(baseline))
    units_ok = bool(seeds) and all(
        variant[s][1] is not None and baseline[s][1] is not None and len(variant[s][1]) == len(baseline[s][1])
        for s in seeds
    )
    xs: list[float] = []
    ys: list[float] = []
    if units_ok:
        for s in seeds:
            for x, y in zip(variant[s][1], baseline[s][1], strict=True):
                if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
                    xs.append(float(x))
                    ys.append(float(y))
        return xs, ys, "units"
    for s in seeds:
        x, y = variant[s][0], baseline[s][0]
        if x is not None and y is not None:
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys, "seeds"
