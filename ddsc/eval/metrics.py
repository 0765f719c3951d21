"""Evaluation metrics in plain numpy: masked prediction and generation quality (perturbation metrics:
:mod:`ddsc.eval.perturbation`, embeddings: :mod:`ddsc.eval.embedding`).

Every metric here takes arrays, not models, so the model and the baselines are scored by the same code on
the same masks, and every number can be checked by hand on a tiny input (see tests/test_eval_metrics.py).

Definitions (nats, natural log):
- ``masked_ce``: mean over masked positions of -log p(true bin). Only masked positions count: the original
  DDSC accuracy also counted copied (unmasked) positions, which inflates it.
- ``masked_acc``: argmax == true bin; ``masked_acc_pm1``: |argmax - true bin| <= 1.
- ``ece``: expected calibration error of the argmax confidence over equal-width confidence bins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata


@dataclass
class MaskedPredictionStats:
    """Streaming accumulator of masked-position predictions (sums in float64 / int64).

    ``update`` takes predictive probabilities ``[N, K]`` and true bins ``[N]`` for the masked positions of a
    batch, so any predictor (model softmax, baselines) is scored identically, and optionally the evaluation
    cell of each position: per-cell CE sums and counts then feed bootstrap intervals over cells.
    """

    num_bins: int
    calibration_bins: int = 15
    n: int = 0
    ce_sum: float = 0.0
    correct: int = 0
    correct_pm1: int = 0
    confusion: np.ndarray = field(init=False)  # [true bin, predicted bin] counts
    conf_sum: np.ndarray = field(init=False)  # per confidence bin: sum of max probability
    conf_correct: np.ndarray = field(init=False)  # per confidence bin: number correct
    conf_count: np.ndarray = field(init=False)
    cell_ce: np.ndarray = field(init=False)  # per evaluation cell: sum of CE over its masked positions
    cell_n: np.ndarray = field(init=False)  # per evaluation cell: number of masked positions

    def __post_init__(self) -> None:
        self.confusion = np.zeros((self.num_bins, self.num_bins), dtype=np.int64)
        self.conf_sum = np.zeros(self.calibration_bins, dtype=np.float64)
        self.conf_correct = np.zeros(self.calibration_bins, dtype=np.int64)
        self.conf_count = np.zeros(self.calibration_bins, dtype=np.int64)
        self.cell_ce = np.zeros(0)
        self.cell_n = np.zeros(0)

    def update(self, probs: np.ndarray, targets: np.ndarray, cells: np.ndarray | None = None) -> None:
        probs = np.asarray(probs, dtype=np.float64)
        targets = np.asarray(targets, dtype=np.int64)
        if probs.ndim != 2 or probs.shape[1] != self.num_bins or probs.shape[0] != targets.shape[0]:
            raise ValueError(f"probs must be [N, {self.num_bins}] aligned with targets [N], got {probs.shape}")
        if targets.size and (targets.min() < 0 or targets.max() >= self.num_bins):
            raise ValueError(f"targets must be bins in 0..{self.num_bins - 1}")
        if not len(targets):
            return
        pred = probs.argmax(axis=1)
        conf = probs[np.arange(len(targets)), pred]
        hit = pred == targets
        with np.errstate(divide="ignore"):  # p = 0 for the true bin is an infinite loss, reported as such
            ce = -np.log(probs[np.arange(len(targets)), targets])
        self.ce_sum += float(ce.sum())
        if cells is not None:
            cells = np.asarray(cells, dtype=np.int64)
            size = max(len(self.cell_n), int(cells.max()) + 1)
            self.cell_ce = np.pad(self.cell_ce, (0, size - len(self.cell_ce)))
            self.cell_n = np.pad(self.cell_n, (0, size - len(self.cell_n)))
            np.add.at(self.cell_ce, cells, ce)
            np.add.at(self.cell_n, cells, 1.0)
        self.n += len(targets)
        self.correct += int(hit.sum())
        self.correct_pm1 += int((np.abs(pred - targets) <= 1).sum())
        np.add.at(self.confusion, (targets, pred), 1)
        which = np.minimum((conf * self.calibration_bins).astype(np.int64), self.calibration_bins - 1)
        np.add.at(self.conf_sum, which, conf)
        np.add.at(self.conf_correct, which, hit.astype(np.int64))
        np.add.at(self.conf_count, which, 1)

    def calibration(self) -> dict[str, list[float]]:
        """Reliability diagram: mean confidence and accuracy per non-empty confidence bin."""
        used = self.conf_count > 0
        return {
            "confidence": (self.conf_sum[used] / self.conf_count[used]).tolist(),
            "accuracy": (self.conf_correct[used] / self.conf_count[used]).tolist(),
            "count": self.conf_count[used].tolist(),
        }

    def summary(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no masked positions were scored")
        gap = np.abs(self.conf_correct - self.conf_sum)  # per bin: count * |accuracy - confidence|
        return {
            "masked_ce": self.ce_sum / self.n,
            "masked_acc": self.correct / self.n,
            "masked_acc_pm1": self.correct_pm1 / self.n,
            "ece": float(gap.sum() / self.n),
            "num_masked": self.n,
        }


def masked_prediction_metrics(probs: np.ndarray, targets: np.ndarray, num_bins: int | None = None) -> dict:
    """One-shot version of :class:`MaskedPredictionStats` (summary + confusion matrix)."""
    stats = MaskedPredictionStats(num_bins or np.asarray(probs).shape[1])
    stats.update(probs, targets)
    return {**stats.summary(), "confusion": stats.confusion}


# ---------------------------------------------------------------------------------------------- generation


def _dense(x: np.ndarray | sp.spmatrix) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant (no correlation is defined)."""
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def gene_stat_correlations(real: np.ndarray, generated: np.ndarray) -> dict[str, float]:
    """Pearson over genes of the per-gene mean and of the per-gene zero fraction (cells x genes inputs)."""
    real, generated = _dense(real), _dense(generated)
    return {
        "gene_mean_pearson": pearson(real.mean(0), generated.mean(0)),
        "gene_zero_frac_pearson": pearson((real == 0).mean(0), (generated == 0).mean(0)),
    }


@dataclass
class PCA:
    """PCA fitted on one set of cells and applied to others (evaluation: a separate fit set of real cells, so
    that every compared sample is out of sample)."""

    mean: np.ndarray
    components: np.ndarray  # [n_components, genes]

    @classmethod
    def fit(cls, x: np.ndarray, n_components: int = 50) -> PCA:
        x = _dense(x)
        mean = x.mean(0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        n = min(n_components, vt.shape[0])
        # Fix each component's sign (largest |loading| positive) so plots are reproducible across runs.
        signs = np.sign(vt[np.arange(n), np.abs(vt[:n]).argmax(1)])
        return cls(mean=mean, components=vt[:n] * signs[:, None])

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (_dense(x) - self.mean) @ self.components.T


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def median_bandwidth(x: np.ndarray, y: np.ndarray) -> float:
    """Median heuristic: median pairwise distance (off-diagonal) over the pooled sample."""
    z = np.vstack([x, y])
    d = np.sqrt(squared_distances(z, z))[np.triu_indices(len(z), k=1)]
    return float(np.median(d))


def mmd_rbf(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 with k(a, b) = exp(-|a - b|^2 / (2 sigma^2)); sigma from the median heuristic.

    The unbiased estimator drops the diagonal of the within-sample kernel sums, so it is ~0 (and can be
    slightly negative) when both samples come from the same distribution.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("MMD needs at least 2 cells per sample")
    sigma = bandwidth if bandwidth is not None else median_bandwidth(x, y)
    gamma = 1.0 / (2.0 * max(sigma, 1e-12) ** 2)
    kxx, kyy, kxy = (np.exp(-gamma * squared_distances(a, b)) for a, b in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (within-sample means over distinct pairs)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("energy distance needs at least 2 cells per sample")
    dxx, dyy, dxy = (np.sqrt(squared_distances(a, b)) for a, b in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    return float(2.0 * dxy.mean() - dxx.sum() / (m * (m - 1)) - dyy.sum() / (n * (n - 1)))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney rank statistic (ties count one half)."""
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both classes")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def knn_classifier_auc(real: np.ndarray, generated: np.ndarray, k: int = 5, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated kNN real-vs-generated classifier AUC: 0.5 = indistinguishable, 1.0 = fully separable.

    Each cell is scored, out of fold, by the fraction of its ``k`` nearest training-fold neighbours that are
    generated; folds are stratified so both classes keep their proportions.
    """
    x = np.vstack([np.asarray(real, np.float64), np.asarray(generated, np.float64)])
    labels = np.r_[np.zeros(len(real), bool), np.ones(len(generated), bool)]
    rng = np.random.default_rng(seed)
    fold = np.empty(len(x), dtype=np.int64)
    for cls in (False, True):
        idx = np.flatnonzero(labels == cls)
        fold[rng.permutation(idx)] = np.arange(len(idx)) % folds
    scores = np.empty(len(x))
    for f in range(folds):
        test, train = fold == f, fold != f
        d = squared_distances(x[test], x[train])
        kk = min(k, int(train.sum()))
        nearest = np.argpartition(d, kk - 1, axis=1)[:, :kk]
        scores[test] = labels[train][nearest].mean(1)
    return roc_auc(scores, labels)


def pc_variance_ratio(real: np.ndarray, other: np.ndarray, components: int = 10) -> float:
    """Mean over the first ``components`` PCs of var(other) / var(real): < 1 means ``other`` is narrower."""
    n = min(components, real.shape[1])
    return float(np.mean(other[:, :n].var(axis=0) / np.maximum(real[:, :n].var(axis=0), 1e-12)))


def generation_metrics(real: np.ndarray, generated: np.ndarray, pca: PCA, seed: int = 0) -> dict[str, float]:
    """All generation metrics of ``generated`` against ``real`` (cells x genes), distances in ``pca`` space."""
    zr, zg = pca.transform(real), pca.transform(generated)
    return {
        **gene_stat_correlations(real, generated),
        "mmd_rbf_pca": mmd_rbf(zr, zg),
        "energy_distance_pca": energy_distance(zr, zg),
        "knn_auc": knn_classifier_auc(zr, zg, seed=seed),
        "pc_variance_ratio": pc_variance_ratio(zr, zg),
    }
