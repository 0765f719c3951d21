"""Evaluation metrics against values computed by hand on tiny inputs."""

from __future__ import annotations

import numpy as np
import pytest

from ddsc.eval.metrics import (
    PCA,
    MaskedPredictionStats,
    energy_distance,
    gene_stat_correlations,
    knn_classifier_auc,
    masked_prediction_metrics,
    median_bandwidth,
    mmd_rbf,
    pc_variance_ratio,
    pearson,
    roc_auc,
)

PROBS = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05]])
TARGETS = np.array([0, 2, 0, 0])


def test_masked_prediction_metrics_by_hand():
    stats = MaskedPredictionStats(num_bins=3, calibration_bins=4)
    stats.update(PROBS[:2], TARGETS[:2])  # streaming in two chunks == one shot
    stats.update(PROBS[2:], TARGETS[2:])
    out = stats.summary()
    assert out["masked_ce"] == pytest.approx(-(np.log(0.5) + np.log(0.3) + np.log(0.2) + np.log(0.9)) / 4)
    assert out["masked_acc"] == pytest.approx(2 / 4)  # argmax 0,1,2,0 vs 0,2,0,0
    assert out["masked_acc_pm1"] == pytest.approx(3 / 4)  # |2 - 0| = 2 is the only miss
    # confidences .5 .6 .6 -> bin 2 (1 of 3 right), .9 -> bin 3 (right): (|1 - 1.7| + |1 - .9|) / 4
    assert out["ece"] == pytest.approx(0.2)
    expected = np.zeros((3, 3), int)
    expected[0, 0], expected[2, 1], expected[0, 2] = 2, 1, 1
    np.testing.assert_array_equal(stats.confusion, expected)
    cal = stats.calibration()
    assert cal["confidence"] == pytest.approx([1.7 / 3, 0.9])
    assert cal["accuracy"] == pytest.approx([1 / 3, 1.0])
    one_shot = masked_prediction_metrics(PROBS, TARGETS)
    assert one_shot["masked_ce"] == pytest.approx(out["masked_ce"])
    np.testing.assert_array_equal(one_shot["confusion"], expected)


def test_zero_probability_on_target_is_infinite_and_bad_shapes_fail():
    assert np.isinf(masked_prediction_metrics(np.array([[1.0, 0.0]]), np.array([1]))["masked_ce"])
    with pytest.raises(ValueError, match="targets must be bins"):
        masked_prediction_metrics(np.array([[1.0, 0.0]]), np.array([2]))
    with pytest.raises(ValueError, match="no masked positions"):
        MaskedPredictionStats(2).summary()


def test_pearson_and_gene_stat_correlations_by_hand():
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / np.sqrt(2 * 114 / 9))
    assert np.isnan(pearson([1, 1, 1], [1, 2, 3]))
    real = np.array([[0, 1, 2], [2, 0, 2], [0, 5, 2]])
    gen = np.array([[1, 0, 0], [0, 2, 0], [1, 4, 3]])
    out = gene_stat_correlations(real, gen)
    assert out["gene_mean_pearson"] == pytest.approx(60 / np.sqrt(96 * 78))  # means (2/3,2,2) vs (2/3,2,1)
    assert out["gene_zero_frac_pearson"] == pytest.approx(-np.sqrt(3) / 2)  # (2/3,1/3,0) vs (1/3,1/3,2/3)


def test_mmd_energy_and_bandwidth_by_hand():
    x, y = np.array([[0.0], [1.0]]), np.array([[3.0], [5.0]])
    assert median_bandwidth(x, y) == pytest.approx(2.5)  # pooled distances 1,2,2,3,4,5
    cross = np.exp(-np.array([9.0, 25.0, 4.0, 16.0]) / 2).mean()
    assert mmd_rbf(x, y, bandwidth=1.0) == pytest.approx(np.exp(-0.5) + np.exp(-2.0) - 2 * cross)
    assert mmd_rbf(x, y) == pytest.approx(mmd_rbf(x, y, bandwidth=2.5))
    assert energy_distance(x, y) == pytest.approx(2 * 3.5 - 1.0 - 2.0)


def test_mmd_and_energy_near_zero_for_same_distribution():
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=(200, 3)), rng.normal(size=(200, 3)), rng.normal(1.0, size=(200, 3))
    assert abs(mmd_rbf(a, b)) < 0.01 < mmd_rbf(a, c)
    assert abs(energy_distance(a, b)) < 0.05 < energy_distance(a, c)


def test_roc_auc_and_knn_auc():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    rng = np.random.default_rng(1)
    real = rng.normal(size=(150, 2))
    assert knn_classifier_auc(real, rng.normal(100.0, size=(150, 2))) == pytest.approx(1.0)
    assert abs(knn_classifier_auc(real, rng.normal(size=(150, 2))) - 0.5) < 0.1


def test_pca_matches_covariance_eigendecomposition():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 4)) * np.array([5.0, 2.0, 1.0, 0.5]) @ np.linalg.qr(rng.normal(size=(4, 4)))[0]
    pca = PCA.fit(x, n_components=2)
    evals, evecs = np.linalg.eigh(np.cov(x.T, ddof=0))
    z = pca.transform(x)
    np.testing.assert_allclose(z.var(0), evals[::-1][:2], rtol=1e-8)
    np.testing.assert_allclose(np.abs(pca.components @ evecs[:, ::-1][:, :2]), np.eye(2), atol=1e-8)
    assert pca.transform(x.mean(0, keepdims=True)) == pytest.approx(np.zeros((1, 2)), abs=1e-9)


def test_per_cell_sums_follow_the_cell_of_each_position():
    stats = MaskedPredictionStats(num_bins=3)
    stats.update(PROBS[:2], TARGETS[:2], cells=np.array([4, 1]))
    stats.update(PROBS[2:], TARGETS[2:], cells=np.array([1, 1]))
    ce = -np.log([0.5, 0.3, 0.2, 0.9])
    np.testing.assert_allclose(stats.cell_n, [0, 3, 0, 0, 1])
    np.testing.assert_allclose(stats.cell_ce, [0, ce[1] + ce[2] + ce[3], 0, 0, ce[0]])
    assert stats.cell_ce.sum() / stats.cell_n.sum() == pytest.approx(stats.summary()["masked_ce"])


def test_pc_variance_ratio_by_hand():
    real = np.array([[1.0, 0.0], [-1.0, 0.0], [3.0, 2.0], [-3.0, -2.0]])  # variances 5 and 2
    narrow = real * np.array([0.5, 1.0])  # first PC a quarter of the variance, second unchanged
    assert pc_variance_ratio(real, narrow, components=2) == pytest.approx((0.25 + 1.0) / 2)
    assert pc_variance_ratio(real, narrow, components=1) == pytest.approx(0.25)
