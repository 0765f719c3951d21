"""95% bootstrap confidence intervals over cells (or over groups, for per-group metrics).

Cells, not positions, are resampled: the masked positions of one cell share its bins, its histogram and its
neighbours, so they are not independent and resampling them would understate the spread. Resamples are drawn
once as multinomial counts ``[R, n]``, so every statistic that is a function of per-cell sums (masked CE = sum
of CE / number of masked positions, a margin between two predictors, a Pearson correlation, an accuracy) is
evaluated for all resamples with one matrix product, and the model and every baseline see the *same*
resamples (paired intervals for margins). Intervals are percentile intervals.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95


def resample_weights(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """``[resamples, n]`` float64: how often each of ``n`` units appears in each resample (rows sum to n)."""
    rng = np.random.default_rng([seed, n])
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64) if n else np.zeros((0, 0))


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> list[float]:
    """``[low, high]`` percentiles of the finite ``values`` ([nan, nan] when none is finite)."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return [float("nan"), float("nan")]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def ratio_interval(numerator: np.ndarray, denominator: np.ndarray, weights: np.ndarray) -> list[float]:
    """Interval of ``sum(numerator) / sum(denominator)`` (per-unit sums) over the resamples in ``weights``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return percentile_interval((weights @ numerator) / (weights @ denominator))


def mean_interval(values: np.ndarray, weights: np.ndarray) -> list[float]:
    """Interval of the mean of per-unit ``values``, NaN units left out of each resample (as ``np.nanmean``)."""
    values = np.asarray(values, np.float64)
    finite = np.isfinite(values)
    return ratio_interval(np.where(finite, values, 0.0), finite.astype(np.float64), weights)


def pearson_interval(x: np.ndarray, y: np.ndarray, unit: np.ndarray, weights: np.ndarray) -> list[float]:
    """Interval of the Pearson correlation of pooled pairs ``(x, y)``, each pair belonging to unit ``unit``.

    Resampling a unit repeats all its pairs, so the correlation of a resample follows from per-unit sums of
    x, y, x^2, y^2 and xy: no pair is touched per resample.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n_units = weights.shape[1]
    sums = np.stack([np.bincount(unit, v, minlength=n_units) for v in (np.ones_like(x), x, y, x * x, y * y, x * y)])
    n, sx, sy, sxx, syy, sxy = (weights @ sums.T).T  # each [resamples]
    cov = sxy - sx * sy / n
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.sqrt((sxx - sx * sx / n) * (syy - sy * sy / n))
    return percentile_interval(r)
