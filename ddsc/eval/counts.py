"""Imputation in count space: the masked genes' counts, scored like MAGIC / scVI imputations are.

Every bin predictor (the model and the bin baselines) gives a distribution over a masked gene's bins; its
implied count is the expectation of the cell's representative count per bin, ``sum_b p(b) * value[cell, b]``,
where ``value`` is what ``ddsc impute`` uses (:func:`ddsc.data.binning.bin_values`: for per-cell quantile bins,
the cell's quantile at the middle of the bin). The values come from the cell's *observed* (unmasked) counts
only, as in ``ddsc impute``: a hidden count must not leak into the counts it is scored against.

Two imputations that never see bins are scored beside them:
- ``gene_mean``: the gene's mean count over the train cells that express it (masked genes are expressed);
- ``knn_mean``: the mean count of the gene over the ``k`` train cells nearest on the observed genes (the
  neighbours of :class:`~ddsc.eval.baselines.KNNBaseline`) that express it, else the gene mean.

Scores, over all masked positions pooled: Pearson and Spearman correlation of ``log1p(imputed)`` with
``log1p(true count)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from scipy.stats import rankdata

from ddsc.data.binning import bin_values
from ddsc.data.binning_config import BinningConfig
from ddsc.eval.baselines import KNNBaseline, Query, lookup
from ddsc.eval.bootstrap import pearson_interval
from ddsc.eval.cells import EvalCells
from ddsc.eval.metrics import pearson


def cell_bin_values(cells: EvalCells, idx: Sequence[int], masks: Sequence[np.ndarray], cfg: BinningConfig):
    """``[len(idx), K]`` float64: each cell's representative count per bin, from its unmasked counts."""
    width = max((len(cells.genes[i]) for i in idx), default=0)
    counts = torch.zeros(len(idx), width, dtype=torch.float64)
    observed = torch.zeros(len(idx), width, dtype=torch.bool)
    for row, (i, mask) in enumerate(zip(idx, masks, strict=True)):
        counts[row, : len(mask)] = torch.from_numpy(cells.counts[i])
        observed[row, : len(mask)] = torch.from_numpy(~mask)
    return bin_values(counts, observed, cfg, (counts * observed).sum(dim=1)).numpy()


@dataclass
class GeneMeanCounts:
    """Mean count of each gene over the train cells expressing it; genes never seen get the overall mean."""

    index: np.ndarray  # gene id -> row (``gene_index``)
    means: np.ndarray  # [genes]
    overall: float

    @classmethod
    def fit(cls, index: np.ndarray, counts: sp.csr_matrix) -> GeneMeanCounts:
        """From train counts [cells, genes] whose columns ``index`` maps gene ids to."""
        present = np.bincount(counts.indices, minlength=counts.shape[1]).astype(np.float64)
        totals = np.asarray(counts.sum(axis=0)).ravel()
        overall = float(totals.sum() / max(present.sum(), 1.0))
        means = np.where(present > 0, totals / np.maximum(present, 1.0), overall)
        return cls(index, means, overall)

    def predict(self, queries: Sequence[Query]) -> np.ndarray:
        masked = [np.asarray(g)[m] for g, _, m in queries]
        col = lookup(self.index, np.concatenate(masked)) if masked else np.zeros(0, np.int64)
        return np.where(col >= 0, self.means[np.maximum(col, 0)], self.overall)


@dataclass
class KNNMeanCounts:
    """Mean count of the gene over the query's ``k`` nearest train cells that express it (else the gene mean)."""

    knn: KNNBaseline
    counts: sp.csr_matrix  # train counts, rows and columns as ``knn.train``
    gene_mean: GeneMeanCounts

    @classmethod
    def fit(cls, knn: KNNBaseline, train: EvalCells) -> KNNMeanCounts:
        rows = np.repeat(np.arange(len(train)), [len(g) for g in train.genes])
        cols = knn.gene_col[np.concatenate(train.genes)]
        counts = sp.csr_matrix((np.concatenate(train.counts), (rows, cols)), shape=knn.train.shape)
        counts.sum_duplicates()
        return cls(knn, counts, GeneMeanCounts.fit(knn.gene_col, counts))

    def predict(self, queries: Sequence[Query]) -> np.ndarray:
        fallback = self.gene_mean.predict(queries)
        out, start = [], 0
        for part in range(0, len(queries), self.knn.chunk):
            chunk = queries[part : part + self.knn.chunk]
            for (genes, _, masked), nbrs in zip(chunk, self.knn.neighbours(chunk), strict=True):
                col = lookup(self.knn.gene_col, np.asarray(genes)[masked])
                prior = fallback[start : start + len(col)]
                start += len(col)
                values = self.counts[nbrs][:, np.maximum(col, 0)].toarray()  # [k, masked]
                present = (values > 0) & (col >= 0)[None, :]
                n = present.sum(axis=0)
                out.append(np.where(n > 0, (values * present).sum(axis=0) / np.maximum(n, 1), prior))
        return np.concatenate(out) if out else np.zeros(0)


@dataclass
class CountStats:
    """Imputed and true counts of the masked positions of one predictor, with the evaluation cell of each."""

    imputed: list[np.ndarray] = field(default_factory=list)
    true: list[np.ndarray] = field(default_factory=list)
    cells: list[np.ndarray] = field(default_factory=list)

    def update(self, imputed: np.ndarray, true: np.ndarray, cells: np.ndarray) -> None:
        self.imputed.append(np.asarray(imputed, np.float64))
        self.true.append(np.asarray(true, np.float64))
        self.cells.append(np.asarray(cells, np.int64))

    def summary(self, weights: np.ndarray) -> dict:
        """Pearson (with its 95% interval over the cell resamples ``weights``) and Spearman on log1p."""
        x, y = np.log1p(np.concatenate(self.imputed)), np.log1p(np.concatenate(self.true))
        return {
            "pearson_log1p": pearson(x, y),
            "pearson_log1p_ci95": pearson_interval(x, y, np.concatenate(self.cells), weights),
            "spearman_log1p": pearson(rankdata(x), rankdata(y)),  # Spearman: Pearson of the ranks
            "num_masked": len(x),
        }


def count_summary(by_name: dict[str, CountStats], weights: np.ndarray, baselines: list[str]) -> dict:
    """Count-space scores per predictor, the best baseline by Pearson and the model's margin over it."""
    scores = {name: s.summary(weights) for name, s in by_name.items()}
    best = max(baselines, key=lambda name: scores[name]["pearson_log1p"])
    return {
        "scores": scores,
        "best_baseline": best,
        "model_minus_best": scores["model"]["pearson_log1p"] - scores[best]["pearson_log1p"],
    }
