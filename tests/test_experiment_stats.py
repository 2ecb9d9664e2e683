"""`noisyft experiment` statistics against hand-computed cases and a direct numpy bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from noisyft.experiment.stats import mean_std, paired_bootstrap, paired_pairs


def test_mean_std_by_hand():
    # mean of 1, 2, 4 is 7/3; squared deviations 16/9, 1/9, 25/9 sum to 42/9; / (n - 1) = 7/3
    r = mean_std([1.0, 2.0, 4.0])
    assert r["n"] == 3
    assert r["mean"] == pytest.approx(7 / 3, abs=1e-15)
    assert r["std"] == pytest.approx(math.sqrt(7 / 3), abs=1e-15)
    assert mean_std([5.0]) == {"mean": 5.0, "std": None, "n": 1}
    assert mean_std([]) == {"mean": None, "std": None, "n": 0}
    assert mean_std([1.0, float("nan"), 3.0])["n"] == 2


def test_identical_pairs_give_a_zero_width_interval_at_zero():
    x = [0.3, 1.7, 2.2, 5.0, 0.1]
    r = paired_bootstrap(x, x)
    assert (r["estimate"], r["ci_low"], r["ci_high"]) == (0.0, 0.0, 0.0)
    assert r["n"] == 5 and r["level"] == 0.95


def test_a_constant_shift_gives_an_interval_at_the_shift_whatever_the_spread():
    base = np.array([0.1, 3.0, -2.0, 7.5, 0.4, 1.1])  # large spread between units ...
    r = paired_bootstrap(base + 0.25, base)  # ... but pairing removes it
    assert r["estimate"] == pytest.approx(0.25, abs=1e-12)
    assert r["ci_low"] == pytest.approx(0.25, abs=1e-12) and r["ci_high"] == pytest.approx(0.25, abs=1e-12)


def test_pairing_matters_an_unpaired_view_would_be_wide():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 5, size=40)
    treated = base + 1.0 + rng.normal(0, 0.1, size=40)
    r = paired_bootstrap(treated, base)
    assert r["ci_low"] < 1.0 < r["ci_high"]
    assert r["ci_high"] - r["ci_low"] < 0.2  # the between-unit spread (std 5) cancels in the pairs


def test_scipy_paired_percentile_interval_matches_a_direct_numpy_bootstrap():
    rng = np.random.default_rng(7)
    base = rng.normal(2.0, 1.0, size=30)
    treated = base - 0.3 + rng.normal(0, 0.4, size=30)
    r = paired_bootstrap(treated, base, method="percentile", n_resamples=20000, seed=3)
    # the same bootstrap by hand: resample pair indices, mean difference, 2.5 / 97.5 percentiles
    d = treated - base
    idx = np.random.default_rng(11).integers(0, d.size, size=(20000, d.size))
    stats = d[idx].mean(axis=1)
    low, high = np.percentile(stats, [2.5, 97.5])
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert r["method"] == "percentile"
    assert r["estimate"] == pytest.approx(d.mean(), abs=1e-12)
    # two independent Monte Carlo runs of 20000 resamples: the percentiles agree to a few % of a standard error
    assert r["ci_low"] == pytest.approx(low, abs=0.05 * se)
    assert r["ci_high"] == pytest.approx(high, abs=0.05 * se)
    # and both are close to the normal-theory interval mean ± 1.96 se
    assert r["ci_low"] == pytest.approx(d.mean() - 1.96 * se, abs=0.25 * se)


def test_bca_is_the_default_and_one_pair_has_no_interval():
    rng = np.random.default_rng(0)
    base = rng.normal(size=20)
    r = paired_bootstrap(base + rng.normal(0.5, 0.2, size=20), base)
    assert r["method"] == "BCa" and r["ci_low"] < r["estimate"] < r["ci_high"]
    one = paired_bootstrap([1.0], [0.5])
    assert one["estimate"] == 0.5 and one["ci_low"] is None and one["ci_high"] is None
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        paired_bootstrap([1.0, 2.0], [1.0])


def test_pairs_use_units_when_every_matched_seed_has_them_else_seeds():
    variant = {1: (1.0, [1.0, 2.0]), 2: (2.0, [3.0, None]), 3: (9.0, [0.0, 0.0])}
    baseline = {1: (0.5, [0.5, 1.5]), 2: (1.5, [2.0, 4.0])}  # seed 3 has no baseline: not paired
    xs, ys, how = paired_pairs(variant, baseline)
    assert how == "units" and xs == [1.0, 2.0, 3.0] and ys == [0.5, 1.5, 2.0]  # the None pair is dropped
    baseline[2] = (1.5, None)
    xs, ys, how = paired_pairs(variant, baseline)
    assert how == "seeds" and xs == [1.0, 2.0] and ys == [0.5, 1.5]
