"""Embedding scores: hand-computed values, ~1 on separable clusters, ~chance on shuffled labels."""

from __future__ import annotations

import numpy as np
import pytest

from ddsc.eval.embedding import (
    adjusted_rand_index,
    embedding_eval,
    kmeans,
    knn_predictions,
    label_scores,
    pca_baseline,
)
from ddsc.eval.metrics import PCA


def _clusters(n_per: int = 60, k: int = 3, dims: int = 8, spread: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dims)) * 5
    x = np.vstack([c + spread * rng.normal(size=(n_per, dims)) for c in centres])
    return x, np.repeat([f"type{i}" for i in range(k)], n_per)


def test_adjusted_rand_index_by_hand():
    # contingency [[2, 0, 0], [0, 1, 1]]: pair sums 1 (cells), rows 2, columns 1, all pairs 6
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx((1 - 2 / 6) / (1.5 - 2 / 6))
    assert adjusted_rand_index(["a", "a", "b", "b"], [5, 5, 9, 9]) == 1.0  # identical up to renaming
    assert adjusted_rand_index([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(-0.5)


def test_knn_predictions_by_hand():
    x = np.array([[0.0], [1.0], [3.0], [10.0], [11.0]])
    labels = np.array(["b", "a", "a", "b", "b"])
    np.testing.assert_array_equal(knn_predictions(x, labels, k=1), ["a", "b", "a", "b", "b"])  # nearest other
    # k=2: points 1, 2 and 3 each see one "a" and one "b" vote, and the nearer neighbour decides (point 1: the
    # "b" at distance 1 over the "a" at 2, although "a" sorts first)
    np.testing.assert_array_equal(knn_predictions(x, labels, k=2), ["a", "b", "a", "b", "b"])
    assert knn_predictions(x, labels, k=10).shape == (5,)  # k capped at the 4 other cells


def test_separable_clusters_score_one_and_shuffled_labels_chance():
    x, labels = _clusters()
    good = label_scores(x, labels, k=10)
    assert good["knn_accuracy"] == 1.0 and good["ari"] == pytest.approx(1.0)
    low, high = good["knn_accuracy_ci95"]
    assert low == high == 1.0
    shuffled = np.random.default_rng(1).permutation(labels)
    bad = label_scores(x, shuffled, k=10)
    assert abs(bad["knn_accuracy"] - 1 / 3) < 0.12 and abs(bad["ari"]) < 0.05
    assert bad["knn_accuracy_ci95"][0] < 1 / 3 < bad["knn_accuracy_ci95"][1] + 0.05
    np.testing.assert_array_equal(kmeans(x, 3, seed=0), kmeans(x, 3, seed=0))  # seeded


def test_embedding_eval_layout():
    x, labels = _clusters(n_per=20, k=2)
    noise = np.random.default_rng(0).normal(size=x.shape)
    out = embedding_eval({"good": x, "noise": noise}, {"type": list(labels)}, k=5)
    assert out["type"]["num_labels"] == 2 and out["type"]["majority_fraction"] == 0.5
    assert out["type"]["good"]["knn_accuracy"] == 1.0 > out["type"]["noise"]["knn_accuracy"]


def test_pca_baseline_is_pca_of_median_normalised_log1p():
    samples = [
        {"genes": np.array([3, 4, 5]), "counts": np.array([1, 2, 3])},  # total 6
        {"genes": np.array([4, 6]), "counts": np.array([4, 8])},  # total 12
        {"genes": np.array([3, 6]), "counts": np.array([9, 9])},  # total 18; median total 12
    ]
    dense = np.array([[1, 2, 3, 0], [0, 4, 0, 8], [9, 0, 0, 9]], float) * (12 / np.array([6, 12, 18]))[:, None]
    expected = PCA.fit(np.log1p(dense), n_components=2).transform(np.log1p(dense))
    np.testing.assert_allclose(pca_baseline(samples), expected)
