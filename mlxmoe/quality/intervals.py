"""Bootstrap confidence intervals for the means eval reports.

Percentile bootstrap over passages: resample the passages (with
replacement, within each domain so every domain keeps its count and the
domain-balanced mean keeps its meaning), recompute the statistic, take the
2.5th and 97.5th percentiles. Fixed seed, 1000 resamples: the same report
gives the same intervals. How to read them: docs/QUALITY.md."""

from __future__ import annotations

import numpy as np

RESAMPLES = 1000
SEED = 0


def resample_indices(strata, resamples: int = RESAMPLES, seed: int = SEED) -> list[np.ndarray]:
    """Per stratum (a label per passage), a [resamples, n_stratum] array of
    passage indices drawn with replacement inside that stratum."""
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    out = []
    for s in sorted(set(strata.tolist())):
        idx = np.flatnonzero(strata == s)
        out.append(idx[rng.integers(0, len(idx), size=(resamples, len(idx)))])
    return out


def ratio_of_sums(num, den, draws: list[np.ndarray]) -> np.ndarray:
    """[resamples, strata]: sum(num)/sum(den) of each stratum in each resample."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.stack([num[d].sum(1) / np.maximum(den[d].sum(1), 1e-12) for d in draws], axis=1)


def interval(samples, level: float = 0.95) -> list[float]:
    """Percentile interval [lo, hi] of bootstrap samples."""
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(np.asarray(samples, dtype=np.float64), [a, 100 - a])
    return [float(lo), float(hi)]


def bootstrap_mean(values, strata=None, resamples: int = RESAMPLES, seed: int = SEED, level: float = 0.95) -> list[float]:
    """Interval of the (stratum-balanced) mean of per-passage `values`."""
    values = np.asarray(values, dtype=np.float64)
    draws = resample_indices(np.zeros(len(values)) if strata is None else strata, resamples, seed)
    return interval(ratio_of_sums(values, np.ones_like(values), draws).mean(1), level)
