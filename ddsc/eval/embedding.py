"""Embedding evaluation: do ``ddsc embed`` embeddings separate the labels a user cares about?

For every label column (the demo's cell line, drug and dose; any column the user names) and every embedding
(``ddsc embed``'s ``X_ddsc_labels``, ``X_ddsc_cls`` and ``X_ddsc_mean``, and the baseline: PCA-50 of
log1p-normalised counts, the first step of every scanpy analysis), two scores on the same cells:

- ``knn_accuracy``: leave-one-out k-nearest-neighbour classification (Euclidean; majority vote, a tie goes
  to the label of the nearer neighbours), with its 95% bootstrap interval over cells. Chance is about the
  frequency of the most common label (``majority_fraction``).
- ``ari``: adjusted Rand index between the labels and a k-means clustering with as many clusters as labels
  (k-means++ seeding, the best of ``n_init`` runs by inertia). 0 = chance, 1 = the clusters are the labels.

Baseline: counts normalised to the median total count of the cells, log1p, restricted to the
``PCA_GENES`` genes detected in the most cells (scanpy's default number of highly variable genes), centred,
first 50 principal components.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from scipy.special import comb

from ddsc.eval.bootstrap import mean_interval, resample_weights
from ddsc.eval.metrics import PCA, squared_distances

PCA_GENES = 2000
PCA_COMPONENTS = 50


def knn_predictions(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Leave-one-out kNN label of every row of ``x`` (a cell never votes for itself)."""
    x = np.asarray(x, np.float64)
    classes, y = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    k = min(k, len(x) - 1)
    d = squared_distances(x, x)
    np.fill_diagonal(d, np.inf)
    nearest = np.argsort(d, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(x), len(classes)))
    weight = 1.0 + 1e-6 * (k - np.arange(k))  # equal counts: the nearer neighbours decide
    np.add.at(votes, (np.arange(len(x))[:, None], y[nearest]), weight[None, :])
    return classes[votes.argmax(axis=1)]


def kmeans(x: np.ndarray, k: int, seed: int = 0, n_init: int = 10, max_iter: int = 100) -> np.ndarray:
    """Cluster ids of the rows of ``x``: Lloyd's algorithm from k-means++ seeds, best of ``n_init`` runs."""
    x = np.asarray(x, np.float64)
    rng = np.random.default_rng(seed)
    best, best_inertia = np.zeros(len(x), np.int64), np.inf
    for _ in range(n_init):
        centres = x[[rng.integers(len(x))]]
        while len(centres) < k:
            d = squared_distances(x, centres).min(axis=1)
            p = d / d.sum() if d.sum() > 0 else np.full(len(x), 1.0 / len(x))
            centres = np.vstack([centres, x[rng.choice(len(x), p=p)]])
        assign = np.full(len(x), -1)
        for _ in range(max_iter):
            new = squared_distances(x, centres).argmin(axis=1)
            if np.array_equal(new, assign):
                break
            assign = new
            centres = np.stack([x[assign == c].mean(0) if (assign == c).any() else centres[c] for c in range(k)])
        inertia = float(squared_distances(x, centres)[np.arange(len(x)), assign].sum())
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    return best


def adjusted_rand_index(a: Sequence, b: Sequence) -> float:
    """Hubert-Arabie adjusted Rand index of two labellings (1 when identical up to renaming)."""
    _, ia = np.unique(np.asarray(a).astype(str), return_inverse=True)
    _, ib = np.unique(np.asarray(b).astype(str), return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(table, (ia, ib), 1)
    pairs = comb(table, 2).sum()
    rows, cols, total = comb(table.sum(1), 2).sum(), comb(table.sum(0), 2).sum(), comb(len(ia), 2)
    expected = rows * cols / total
    top = (rows + cols) / 2
    return float((pairs - expected) / (top - expected)) if top != expected else 1.0


def pca_baseline(samples: Sequence[dict]) -> np.ndarray:
    """PCA-50 of log1p counts normalised to the median total, over the ``PCA_GENES`` most detected genes."""
    rows = np.repeat(np.arange(len(samples)), [len(s["genes"]) for s in samples])
    genes = np.concatenate([np.asarray(s["genes"], np.int64) for s in samples])
    counts = np.concatenate([np.asarray(s["counts"], np.float64) for s in samples])
    ids, cols = np.unique(genes, return_inverse=True)
    x = sp.csr_matrix((counts, (rows, cols)), shape=(len(samples), len(ids)))
    x.sum_duplicates()
    totals = np.asarray(x.sum(axis=1)).ravel()
    x = sp.diags(np.median(totals) / np.maximum(totals, 1.0)) @ x
    detected = np.bincount(x.indices, minlength=x.shape[1])
    keep = np.sort(np.argsort(-detected, kind="stable")[:PCA_GENES])
    dense = np.log1p(x[:, keep].toarray())
    return PCA.fit(dense, n_components=min(PCA_COMPONENTS, len(samples) - 1, len(keep))).transform(dense)


def label_scores(x: np.ndarray, labels: np.ndarray, k: int, seed: int = 0) -> dict:
    """kNN accuracy (with its interval) and k-means ARI of embedding ``x`` for one label column."""
    labels = np.asarray(labels).astype(str)
    correct = (knn_predictions(x, labels, k) == labels).astype(np.float64)
    clusters = kmeans(x, len(np.unique(labels)), seed=seed)
    return {
        "knn_accuracy": float(correct.mean()),
        "knn_accuracy_ci95": mean_interval(correct, resample_weights(len(x), seed=seed)),
        "ari": adjusted_rand_index(labels, clusters),
    }


def embedding_eval(
    embeddings: dict[str, np.ndarray], labels: dict[str, Sequence[str]], k: int = 10, seed: int = 0
) -> dict:
    """``{column: {embedding: scores}, ...}`` plus, per column, its number of labels and majority fraction."""
    out = {}
    for column, values in labels.items():
        values = np.asarray(values).astype(str)
        _, freq = np.unique(values, return_counts=True)
        out[column] = {
            "num_labels": len(freq),
            "majority_fraction": float(freq.max() / len(values)),
            **{name: label_scores(x, values, k, seed) for name, x in embeddings.items()},
        }
    return out
