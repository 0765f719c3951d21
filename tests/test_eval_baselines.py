"""Baselines and fixed masks on toy data with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddsc.eval.baselines import (
    SMOOTHING_GRID,
    CellHistogramBaseline,
    GeneCellProductBaseline,
    GeneMarginalBaseline,
    KNNBaseline,
    masked_ce,
    smoothing_queries,
)
from ddsc.eval.masks import MASK_RATES, batch_mask, cell_mask
from ddsc.eval.metrics import masked_prediction_metrics


def test_marginal_by_hand():
    cells = [(np.array([10, 11]), np.array([0, 2])), (np.array([10]), np.array([0])), (np.array([10]), np.array([1]))]
    base = GeneMarginalBaseline.fit(cells, num_bins=3, alpha=1.0)
    glob = np.array([3, 2, 2]) / 7  # bin histogram (2, 1, 1) + 1 each, over 4 + 3
    np.testing.assert_allclose(base.global_probs, glob)
    probs = base.gene_probs(np.array([10, 99]))
    np.testing.assert_allclose(probs[0], (np.array([2, 1, 0]) + glob) / 4)
    np.testing.assert_allclose(probs[1], glob)  # unseen gene: global distribution
    query = (np.array([11, 10, 99]), np.array([2, 0, 1]), np.array([False, True, True]))
    np.testing.assert_allclose(base.predict([query]), probs)


def _two_types(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Type A: genes 3,4 low, gene 5 high; type B the opposite. K = 3."""
    genes = np.array([3, 4, 5])
    return [(genes, np.array([0, 0, 2]))] * n + [(genes, np.array([2, 2, 0]))] * n


def test_knn_recovers_cell_type_where_marginal_cannot():
    cells = _two_types(10)
    knn = KNNBaseline.fit(cells, num_bins=3, k=5, alpha=1.0)
    query = (np.array([3, 4, 5]), np.array([0, 0, 2]), np.array([False, False, True]))  # type A, gene 5 hidden
    marg = knn.marginal.gene_probs(np.array([5]))[0]
    glob = np.array([31, 1, 31]) / 63  # bins 0/1/2 appear 30/0/30 times
    np.testing.assert_allclose(marg, (np.array([10, 0, 10]) + glob) / 21)
    np.testing.assert_allclose(knn.predict([query])[0], (np.array([0, 0, 5]) + marg) / 6)  # 5 type-A votes
    knn_ce = masked_prediction_metrics(knn.predict([query]), np.array([2]))["masked_ce"]
    marg_ce = masked_prediction_metrics(knn.marginal.predict([query]), np.array([2]))["masked_ce"]
    assert knn_ce == pytest.approx(-np.log((5 + marg[2]) / 6))
    assert knn_ce < 0.2 < np.log(2) - 0.05 < marg_ce


def test_knn_neighbours_match_brute_force_distance():
    rng = np.random.default_rng(0)
    cells = []
    for _ in range(40):
        genes = np.sort(rng.choice(np.arange(3, 30), size=rng.integers(3, 15), replace=False))
        cells.append((genes, rng.integers(0, 5, len(genes))))
    knn = KNNBaseline.fit(cells, num_bins=5, k=4)
    dense = np.zeros((40, 30))
    for i, (g, b) in enumerate(cells):
        dense[i, g] = b + 1
    queries = []
    for genes, bins in cells[:6]:
        masked = rng.random(len(genes)) < 0.5
        queries.append((np.r_[genes, 40], np.r_[bins, 0], np.r_[masked, False]))  # gene 40 never seen in train
    got = knn.neighbours(queries)
    for (genes, bins, masked), nbrs in zip(queries, got, strict=True):
        obs = genes[~masked][:-1]
        dist = ((dense[:, obs] - (bins[~masked][:-1] + 1)) ** 2).sum(1)
        np.testing.assert_allclose(np.sort(dist[nbrs]), np.sort(dist)[:4])
    probs = knn.predict(queries)
    assert probs.shape == (sum(int(m.sum()) for _, _, m in queries), 5)
    np.testing.assert_allclose(probs.sum(1), 1.0)


def test_cell_mask_is_fixed_nested_and_order_free():
    genes = np.arange(100, 140)
    masks = [cell_mask("cell-1", genes, r, seed=3) for r in MASK_RATES]
    assert [int(m.sum()) for m in masks] == [4, 12, 20, 28, 36]
    for small, large in zip(masks, masks[1:], strict=False):
        assert np.all(large[small])  # nested across rates
    perm = np.random.default_rng(0).permutation(40)
    again = cell_mask("cell-1", genes[perm], 0.5, seed=3)
    assert set(genes[perm][again]) == set(genes[masks[2]])  # depends on gene ids, not positions
    assert not np.array_equal(cell_mask("cell-2", genes, 0.5, seed=3), masks[2])
    assert int(cell_mask("c", np.array([7, 8]), 0.1).sum()) == 1  # at least one gene masked


def test_batch_mask_matches_cell_mask_and_skips_cls_and_padding():
    gene_ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 0, 0]])
    real = torch.tensor([[False, True, True, True, True], [False, True, True, False, False]])
    mask = batch_mask(gene_ids, real, ["a", "b"], rate=0.5, seed=1)
    assert not mask[:, 0].any() and not mask[1, 3:].any()
    np.testing.assert_array_equal(mask[0, 1:].numpy(), cell_mask("a", np.array([5, 6, 7, 8]), 0.5, seed=1))
    np.testing.assert_array_equal(mask[1, 1:3].numpy(), cell_mask("b", np.array([9, 10]), 0.5, seed=1))


def test_cell_histogram_by_hand_and_closed_form_ce():
    glob = np.array([0.2, 0.3, 0.5])
    # observed bins 0,0,0,0,1,1,2,2 (histogram q = 1/2, 1/4, 1/4); the masked bins 0,0,1,2 have the same q
    bins = np.array([0, 0, 0, 0, 1, 1, 2, 2, 0, 0, 1, 2])
    masked = np.r_[np.zeros(8, bool), np.ones(4, bool)]
    query = (np.arange(3, 15), bins, masked)
    q = np.array([0.5, 0.25, 0.25])
    probs = CellHistogramBaseline(glob, alpha=1.0).predict([query])
    np.testing.assert_allclose(probs, np.tile((8 * q + glob) / 9, (4, 1)))  # the same for every masked gene
    # unsmoothed, the CE of a histogram on bins drawn exactly like it is the histogram's entropy: 1.5 ln 2
    exact = masked_prediction_metrics(CellHistogramBaseline(glob, alpha=0.0).predict([query]), bins[masked])
    assert exact["masked_ce"] == pytest.approx(-(q * np.log(q)).sum()) == pytest.approx(1.5 * np.log(2))
    smoothed = masked_prediction_metrics(probs, bins[masked])["masked_ce"]
    assert smoothed == pytest.approx(-(q * np.log((8 * q + glob) / 9)).sum()) and smoothed > exact["masked_ce"]
    assert masked_ce(CellHistogramBaseline(glob, alpha=1.0).predict, [query]) == pytest.approx(smoothed)


def test_gene_cell_product_by_hand():
    cells = [(np.array([10, 11]), np.array([0, 2])), (np.array([10]), np.array([0])), (np.array([10]), np.array([1]))]
    marginal = GeneMarginalBaseline.fit(cells, num_bins=3)
    cell = CellHistogramBaseline(marginal.global_probs, alpha=2.0)
    query = (np.array([10, 11, 12]), np.array([1, 1, 0]), np.array([True, False, True]))
    p_gene = marginal.gene_probs(np.array([10, 12]))
    p_cell = (np.array([0, 1, 0]) + 2.0 * marginal.global_probs) / 3.0  # one observed bin: 1
    product = p_gene * p_cell / marginal.global_probs  # the bin prior, in both factors, counted once
    np.testing.assert_allclose(
        GeneCellProductBaseline(marginal, cell).predict([query]), product / product.sum(1, keepdims=True)
    )


def test_smoothing_is_fitted_on_train_cells():
    """Cells whose bins are all alike trust their own histogram (small alpha); cells whose visible bins say
    nothing about the hidden ones fall back on the global histogram (large alpha)."""
    rng = np.random.default_rng(0)
    genes = np.arange(3, 43)
    alike = [(f"a{i}", genes, np.full(40, i % 4)) for i in range(200)]
    noise = [(f"n{i}", genes, rng.integers(0, 4, 40)) for i in range(200)]
    for cells, best in ((alike, SMOOTHING_GRID[0]), (noise, SMOOTHING_GRID[-1])):
        queries = smoothing_queries(cells, seed=0)
        assert [int(m.sum()) for _, _, m in queries[:2]] == [20, 20]  # fixed masks at SMOOTHING_RATE = 0.5
        marginal = GeneMarginalBaseline.fit([(g, b) for _, g, b in cells], num_bins=4)
        assert CellHistogramBaseline.fit(marginal.global_probs, queries).alpha == best
        fitted = GeneCellProductBaseline.fit(marginal, queries)
        assert all(
            masked_ce(fitted.predict, queries)
            <= masked_ce(
                GeneCellProductBaseline(marginal, CellHistogramBaseline(marginal.global_probs, a)).predict, queries
            )
            for a in SMOOTHING_GRID
        )
