"""Correlation statistics for the examples, in numpy (no scipy at run time).

Pearson's r with the Fisher-z p-value, Spearman's rho as Pearson on ranks (average
ranks for ties) with the same large-sample p-value, and percentile bootstrap
intervals. tests/test_examples.py checks them against scipy.stats.
"""

import math

import numpy as np


def ranks(a):
    """Ranks 1..n, ties given their average rank (as scipy.stats.rankdata)."""
    a = np.asarray(a)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # group boundaries of equal values
    new = np.r_[True, sorted_a[1:] != sorted_a[:-1]]
    group = np.cumsum(new) - 1
    counts = np.bincount(group)
    starts = np.cumsum(counts) - counts
    avg = starts + (counts + 1) / 2
    out = np.empty(len(a))
    out[order] = avg[group]
    return out


def pearson(x, y):
    x = np.asarray(x, float) - np.mean(x)
    y = np.asarray(y, float) - np.mean(y)
    return float(np.sum(x * y) / math.sqrt(np.sum(x * x) * np.sum(y * y)))


def spearman(x, y):
    return pearson(ranks(x), ranks(y))


def fisher_p_value(r, n):
    """Two-sided p-value of r = 0 from atanh(r) sqrt(n - 3) ~ N(0, 1)."""
    r = min(max(r, -1 + 1e-15), 1 - 1e-15)
    z = abs(math.atanh(r)) * math.sqrt(n - 3)
    return math.erfc(z / math.sqrt(2))


def bootstrap_interval(stat, x, y, rng, resamples=1000, level=0.95):
    n = len(x)
    vals = np.empty(resamples)
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(resamples):
            idx = rng.integers(0, n, n)
            vals[i] = stat(x[idx], y[idx])
    # a resample that repeats one point has no correlation (0 / 0): with a handful
    # of points that is a fair share of them, so the interval is over the others
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def correlations(x, y, rng, resamples=1000):
    """Pearson and Spearman between `x` and `y` with Fisher-z p-values and 95%
    percentile bootstrap intervals."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    out = {}
    for name, stat in (("pearson", pearson), ("spearman", spearman)):
        r = stat(x, y)
        out[name] = dict(
            r=r,
            p_value=fisher_p_value(r, n),
            bootstrap_95=bootstrap_interval(stat, x, y, rng, resamples),
        )
    out["n"] = n
    return out


def binned_median(x, y, bins=12):
    """Median of y in quantile bins of x: (bin centres, medians, counts)."""
    edges = np.quantile(x, np.linspace(0, 1, bins + 1))
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, bins - 1)
    centres, medians, counts = [], [], []
    for b in range(bins):
        sel = idx == b
        if sel.any():
            centres.append(float(np.median(x[sel])))
            medians.append(float(np.median(y[sel])))
            counts.append(int(sel.sum()))
    return centres, medians, counts
