"""Baselines for masked-bin prediction, scored on the same masks and with the same metrics as the model.

A model that cannot beat these has learned nothing a lookup table or the cell's own visible bins do not give:
- :class:`GeneMarginalBaseline`: the per-gene bin distribution of the train split ("gene X is usually in bin Y").
- :class:`KNNBaseline`: the bins of the ``k`` train cells nearest to the query on its observed genes.
- :class:`CellHistogramBaseline`: the histogram of the query cell's own observed bins, knowing nothing about
  genes. With per-cell quantile bins, ties (most UMI counts are 1-3) give every cell a very uneven bin
  histogram, and the visible part of the cell reveals it: a strong predictor at low mask rates.
- :class:`GeneCellProductBaseline`: per-gene marginal x cell histogram / global bin prior, renormalised (what
  the gene usually does, reweighted by which bins this cell uses): usually the strongest of the four.
All return predictive distributions (never a hard guess), smoothed so the cross-entropy stays finite: the
marginal and the cell histogram back off to the global bin distribution, kNN backs off to the gene's marginal.
The cell histogram's smoothing is fitted on masked train cells (:func:`smoothing_queries`), never on the
evaluation cells.

A cell is given as ``(genes, bins)``: gene token ids and their expression bins ``0..K-1`` (as collated).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ddsc.eval.masks import cell_mask

Cell = tuple[np.ndarray, np.ndarray]  # (gene ids, bins)
Query = tuple[np.ndarray, np.ndarray, np.ndarray]  # (gene ids, bins, masked): predict bins where masked


def gene_index(genes: np.ndarray) -> np.ndarray:
    """Lookup table gene id -> row/column (``-1`` for genes never seen)."""
    index = np.full(int(genes.max()) + 1 if len(genes) else 1, -1, dtype=np.int64)
    index[genes] = np.arange(len(genes))
    return index


def lookup(index: np.ndarray, genes: np.ndarray) -> np.ndarray:
    genes = np.asarray(genes, dtype=np.int64)
    known = (genes >= 0) & (genes < len(index))
    return np.where(known, index[np.where(known, genes, 0)], -1)


@dataclass
class GeneMarginalBaseline:
    """p(bin | gene) = (count[gene, bin] + alpha * p_global(bin)) / (n[gene] + alpha).

    ``p_global`` is the add-one smoothed bin histogram over all train genes; unseen genes get ``p_global``.
    """

    num_bins: int
    genes: np.ndarray  # sorted gene ids seen in train
    counts: np.ndarray  # [len(genes), K] int64
    global_probs: np.ndarray  # [K]
    alpha: float = 1.0

    def __post_init__(self) -> None:
        self.index = gene_index(self.genes)

    @classmethod
    def fit(cls, cells: Iterable[Cell], num_bins: int, alpha: float = 1.0) -> GeneMarginalBaseline:
        gene_chunks, bin_chunks = [], []
        for genes, bins in cells:
            gene_chunks.append(np.asarray(genes, np.int64))
            bin_chunks.append(np.asarray(bins, np.int64))
        all_genes = np.concatenate(gene_chunks) if gene_chunks else np.zeros(0, np.int64)
        all_bins = np.concatenate(bin_chunks) if bin_chunks else np.zeros(0, np.int64)
        if all_bins.size and (all_bins.min() < 0 or all_bins.max() >= num_bins):
            raise ValueError(f"train bins must lie in 0..{num_bins - 1}")
        genes, row = np.unique(all_genes, return_inverse=True)
        counts = np.zeros((len(genes), num_bins), dtype=np.int64)
        np.add.at(counts, (row, all_bins), 1)
        hist = np.bincount(all_bins, minlength=num_bins).astype(np.float64)
        global_probs = (hist + 1.0) / (hist.sum() + num_bins)
        return cls(num_bins=num_bins, genes=genes, counts=counts, global_probs=global_probs, alpha=alpha)

    def gene_probs(self, genes: np.ndarray) -> np.ndarray:
        """Predictive distributions ``[n, K]`` for the given gene ids."""
        row = lookup(self.index, genes)
        counts = np.where(row[:, None] >= 0, self.counts[np.maximum(row, 0)], 0).astype(np.float64)
        return (counts + self.alpha * self.global_probs) / (counts.sum(1, keepdims=True) + self.alpha)

    def predict(self, queries: Sequence[Query]) -> np.ndarray:
        """Probabilities ``[total masked, K]`` for the masked genes of each query, in query order."""
        masked = [np.asarray(g)[m] for g, _, m in queries]
        return self.gene_probs(np.concatenate(masked)) if masked else np.zeros((0, self.num_bins))


@dataclass
class KNNBaseline:
    """kNN imputation: neighbours by squared Euclidean distance on the query's observed genes only.

    Cells are vectors of ``bin + 1`` (0 = gene not in the cell). For a masked gene, the neighbours that carry
    the gene vote with their bin; ``alpha`` pseudo-counts of the gene's marginal keep every bin possible:
    p(bin) = (votes[bin] + alpha * p_marginal(bin | gene)) / (num votes + alpha).
    """

    marginal: GeneMarginalBaseline
    train: sp.csr_matrix  # [cells, genes] bin + 1, 0 where absent
    train_sq: sp.csr_matrix  # elementwise square of train
    gene_col: np.ndarray  # gene id -> column
    k: int = 10
    alpha: float = 1.0
    chunk: int = 256

    @classmethod
    def fit(cls, cells: Sequence[Cell], num_bins: int, k: int = 10, alpha: float = 1.0) -> KNNBaseline:
        cells = [(np.asarray(g, np.int64), np.asarray(b, np.int64)) for g, b in cells]
        if len(cells) < k:
            raise ValueError(f"kNN baseline needs at least k={k} train cells, got {len(cells)}")
        marginal = GeneMarginalBaseline.fit(cells, num_bins, alpha)
        gene_col = marginal.index
        rows = np.repeat(np.arange(len(cells)), [len(g) for g, _ in cells])
        cols = gene_col[np.concatenate([g for g, _ in cells])]
        vals = np.concatenate([b for _, b in cells]).astype(np.float64) + 1.0
        train = sp.csr_matrix((vals, (rows, cols)), shape=(len(cells), len(marginal.genes)))
        train.sum_duplicates()
        return cls(marginal, train, train.multiply(train).tocsr(), gene_col, k, alpha)

    def neighbours(self, queries: Sequence[Query]) -> np.ndarray:
        """Indices ``[len(queries), k]`` of the nearest train cells on each query's observed genes."""
        n_genes = self.train.shape[1]
        rows, cols, vals = [], [], []
        for i, (genes, bins, masked) in enumerate(queries):
            col = lookup(self.gene_col, np.asarray(genes)[~masked])
            keep = col >= 0  # observed genes unseen in train carry no distance information
            rows.append(np.full(int(keep.sum()), i))
            cols.append(col[keep])
            vals.append(np.asarray(bins)[~masked][keep].astype(np.float64) + 1.0)
        rows, cols, vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        q = sp.csr_matrix((vals, (rows, cols)), shape=(len(queries), n_genes))
        observed = sp.csr_matrix((np.ones_like(vals), (rows, cols)), shape=q.shape)
        # |q - x|^2 over observed genes O = sum_O q^2 - 2 q.x + sum_O x^2
        dist = (
            np.asarray(q.multiply(q).sum(1))
            - 2.0 * (q @ self.train.T).toarray()
            + (observed @ self.train_sq.T).toarray()
        )
        k = min(self.k, self.train.shape[0])
        return np.argsort(dist, axis=1, kind="stable")[:, :k]

    def predict(self, queries: Sequence[Query]) -> np.ndarray:
        """Probabilities ``[total masked, K]`` for the masked genes of each query, in query order."""
        out = []
        for start in range(0, len(queries), self.chunk):
            part = queries[start : start + self.chunk]
            for (genes, _, masked), nbrs in zip(part, self.neighbours(part), strict=True):
                target = np.asarray(genes)[masked]
                prior = self.marginal.gene_probs(target)
                col = lookup(self.gene_col, target)
                votes = np.zeros_like(prior)
                known = col >= 0
                if known.any():
                    values = self.train[nbrs][:, col[known]].toarray().astype(np.int64)  # [k, m] bin + 1
                    voter, gene = np.nonzero(values)
                    np.add.at(votes, (np.flatnonzero(known)[gene], values[voter, gene] - 1), 1.0)
                out.append((votes + self.alpha * prior) / (votes.sum(1, keepdims=True) + self.alpha))
        return np.concatenate(out) if out else np.zeros((0, self.marginal.num_bins))


SMOOTHING_GRID: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def masked_ce(predict: Callable[[Sequence[Query]], np.ndarray], queries: Sequence[Query]) -> float:
    """Mean CE (nats) of ``predict`` on the masked bins of ``queries``."""
    targets = np.concatenate([np.asarray(b)[m] for _, b, m in queries])
    return float(-np.log(predict(queries)[np.arange(len(targets)), targets]).mean())


@dataclass
class CellHistogramBaseline:
    """p(bin | cell) = (observed[bin] + alpha * p_global(bin)) / (num observed + alpha), the same for every
    masked gene of the cell: ``observed`` counts the cell's unmasked bins (gene identities are ignored).

    ``alpha`` is fitted (:meth:`fit`) on masked train cells: a cell shows a few dozen bins, so how far to trust
    its histogram over the global one matters (on mouse10k the best alpha, about 10, beats alpha = 1 by up to
    0.18 nats), and the strongest version of a baseline is the one to beat.
    """

    global_probs: np.ndarray  # [K], the train split's smoothed bin histogram (GeneMarginalBaseline.global_probs)
    alpha: float = 1.0

    @classmethod
    def fit(cls, global_probs: np.ndarray, queries: Sequence[Query]) -> CellHistogramBaseline:
        """The ``SMOOTHING_GRID`` alpha with the lowest masked CE on (masked train) ``queries``."""
        return min((cls(global_probs, a) for a in SMOOTHING_GRID), key=lambda b: masked_ce(b.predict, queries))

    def cell_probs(self, queries: Sequence[Query]) -> np.ndarray:
        """One distribution ``[len(queries), K]`` per query cell."""
        k = len(self.global_probs)
        out = np.empty((len(queries), k))
        for i, (_, bins, masked) in enumerate(queries):
            observed = np.bincount(np.asarray(bins, np.int64)[~np.asarray(masked)], minlength=k)
            out[i] = (observed + self.alpha * self.global_probs) / (observed.sum() + self.alpha)
        return out

    def predict(self, queries: Sequence[Query]) -> np.ndarray:
        """Probabilities ``[total masked, K]``: each cell's distribution repeated for its masked genes."""
        per_cell = self.cell_probs(queries)
        return np.repeat(per_cell, [int(np.count_nonzero(m)) for _, _, m in queries], axis=0)


@dataclass
class GeneCellProductBaseline:
    """p(bin | gene, cell) proportional to p_marginal(bin | gene) * p_cell(bin) / p_global(bin), renormalised.

    The naive-Bayes combination of the two: gene and cell evidence taken as independent given the bin. Each
    factor already contains the bin prior once, so the plain product would count it twice and be overconfident
    in the common bins (on mouse10k, where most counts tie in the lowest bin, the plain product scored 1.72 nats
    at mask rate 0.1, worse than either factor, and this one 0.95, both with the fitted alpha = 10). Its cell histogram's alpha is fitted for the
    product (:meth:`fit`); every factor is smoothed, so the result is positive everywhere.
    """

    marginal: GeneMarginalBaseline
    cell: CellHistogramBaseline

    @classmethod
    def fit(cls, marginal: GeneMarginalBaseline, queries: Sequence[Query]) -> GeneCellProductBaseline:
        """The ``SMOOTHING_GRID`` alpha of the cell factor with the lowest masked CE on ``queries``."""
        candidates = [cls(marginal, CellHistogramBaseline(marginal.global_probs, a)) for a in SMOOTHING_GRID]
        return min(candidates, key=lambda b: masked_ce(b.predict, queries))

    def predict(self, queries: Sequence[Query]) -> np.ndarray:
        product = self.marginal.predict(queries) * self.cell.predict(queries) / self.marginal.global_probs
        return product / product.sum(axis=1, keepdims=True)


SMOOTHING_RATE = 0.5  # one alpha for every mask rate: on mouse10k the best alpha is the same at 0.1, 0.5 and 0.9
SMOOTHING_CELLS = 1000


def smoothing_queries(cells: Sequence[tuple[str, np.ndarray, np.ndarray]], seed: int) -> list[Query]:
    """Up to ``SMOOTHING_CELLS`` train cells ``(cell id, genes, bins)`` (a seeded subset) as queries with their
    fixed masks at ``SMOOTHING_RATE``: the data the cell histogram's smoothing is fitted on."""
    cells = [c for c in cells if len(c[1])]
    if len(cells) > SMOOTHING_CELLS:
        keep = np.sort(np.random.default_rng(seed).choice(len(cells), SMOOTHING_CELLS, replace=False))
        cells = [cells[i] for i in keep]
    return [(genes, bins, cell_mask(cell_id, genes, SMOOTHING_RATE, seed)) for cell_id, genes, bins in cells]
