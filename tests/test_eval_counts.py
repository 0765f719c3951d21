"""Count-space imputation and bootstrap intervals, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from ddsc.data.binning_config import BinningConfig
from ddsc.eval.baselines import KNNBaseline
from ddsc.eval.bootstrap import mean_interval, pearson_interval, ratio_interval, resample_weights
from ddsc.eval.cells import EvalCells
from ddsc.eval.counts import CountStats, KNNMeanCounts, cell_bin_values
from ddsc.eval.metrics import pearson


def _cells(genes, bins, counts) -> EvalCells:
    n = len(genes)
    return EvalCells(
        [f"c{i}" for i in range(n)],
        [np.asarray(g, np.int64) for g in genes],
        [np.asarray(b, np.int64) for b in bins],
        np.zeros((n, 0), np.int64),
        {},
        [np.asarray(c, np.float64) for c in counts],
    )


def test_bin_values_come_from_the_observed_counts_only():
    # quantile bins, 2 bins: a bin's value is the cell's quantile at its middle (0.25, 0.75) over the visible
    # counts; the hidden 10 must not move them
    cells = _cells([[3, 4, 5, 6]], [[0, 0, 1, 1]], [[1, 2, 3, 10]])
    cfg = BinningConfig(method="quantile", num_bins=2)
    values = cell_bin_values(cells, [0], [np.array([False, False, False, True])], cfg)
    np.testing.assert_allclose(values, [[1.5, 2.5]])  # quantiles of (1, 2, 3)
    uniform = BinningConfig(method="uniform", num_bins=2, max_count=20.0)
    np.testing.assert_allclose(cell_bin_values(cells, [0], [np.zeros(4, bool)], uniform), [[5.0, 15.0]])


def test_gene_mean_and_knn_mean_counts_by_hand():
    # type A cells: genes 3, 4 low bins, gene 5 count 2; type B the opposite with gene 5 count 40
    genes = [[3, 4, 5]] * 6
    bins = [[0, 0, 2]] * 3 + [[2, 2, 0]] * 3
    counts = [[1, 1, 2]] * 3 + [[30, 30, 40]] * 3
    train = _cells(genes, bins, counts)
    knn = KNNBaseline.fit(train.pairs(), num_bins=3, k=3)
    imputer = KNNMeanCounts.fit(knn, train)
    query_a = (np.array([3, 4, 5, 9]), np.array([0, 0, 2, 0]), np.array([False, False, True, True]))
    # gene 5: (3 * 2 + 3 * 40) / 6; gene 9 unseen: the mean of all 18 train counts, 312 / 18
    np.testing.assert_allclose(imputer.gene_mean.predict([query_a]), [21.0, 312 / 18])
    np.testing.assert_allclose(imputer.predict([query_a]), [2.0, 312 / 18])  # 3 type-A neighbours; 9: fallback


def test_count_stats_score_log1p():
    stats = CountStats()
    stats.update([1.0, 3.0], [0.0, 3.0], [0, 0])
    stats.update([7.0], [15.0], [1])
    out = stats.summary(resample_weights(2, resamples=50))
    x, y = np.log1p([1.0, 3.0, 7.0]), np.log1p([0.0, 3.0, 15.0])
    assert out["pearson_log1p"] == pytest.approx(pearson(x, y))
    assert out["spearman_log1p"] == pytest.approx(1.0) and out["num_masked"] == 3


def test_bootstrap_intervals():
    weights = resample_weights(5, resamples=200, seed=3)
    assert weights.shape == (200, 5) and (weights.sum(1) == 5).all()
    np.testing.assert_array_equal(weights, resample_weights(5, resamples=200, seed=3))
    assert ratio_interval(np.array([2.0, 4, 6, 8, 10]), np.array([1.0, 2, 3, 4, 5]), weights) == [2.0, 2.0]
    low, high = mean_interval(np.array([1.0, np.nan, 3.0, 5.0, 7.0]), weights)  # NaN units left out
    assert 1.0 <= low < 4.0 < high <= 7.0
    # one resample by hand: unit 0 twice, unit 2 once -> the Pearson correlation of those pairs
    x, y, unit = np.array([1.0, 2, 3, 4, 5]), np.array([2.0, 1, 4, 3, 7]), np.array([0, 0, 1, 2, 2])
    single = np.array([[2.0, 0.0, 1.0]])
    expected = pearson(np.r_[x[:2], x[:2], x[3:]], np.r_[y[:2], y[:2], y[3:]])
    assert pearson_interval(x, y, unit, single) == pytest.approx([expected, expected])
