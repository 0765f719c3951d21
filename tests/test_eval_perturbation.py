"""Perturbation metrics (cell-eval definitions) by hand on a tiny input, and against cell-eval itself."""

from __future__ import annotations

import numpy as np
import pytest

from ddsc.eval.metrics import pearson
from ddsc.eval.perturbation import LineCells, differential_expression, fold_change, score_line


def _rows(values, n: int = 10) -> np.ndarray:
    return np.tile(np.asarray(values, np.float64), (n, 1))


# control [1, 4, 2, 2]; d1 moves genes 0 (up) and 1 (down), d2 moves gene 2 (up). Every group is 10 identical
# cells, so a gene either differs between groups (Wilcoxon p ~ 1e-5, far below FDR 0.05 after BH over the 8
# tests of the line) or is identical (no test, p = 1).
REAL = LineCells(_rows([1, 4, 2, 2]), {"d1": _rows([4, 1, 2, 2]), "d2": _rows([1, 4, 6, 2])})
PRED = LineCells(_rows([1, 4, 2, 2]), {"d1": _rows([3, 8, 2, 2]), "d2": _rows([4, 1, 3, 2])})


def test_fold_change_clips_zero_means_like_pdex():
    np.testing.assert_allclose(fold_change([2.0, 0.0, 3.0, 0.0], [1.0, 4.0, 0.0, 0.0]), [2.0, 1 / 20, 20.0, 1.0])


def test_differential_expression_by_hand():
    de = differential_expression(REAL)
    np.testing.assert_allclose(de.log2_fold_change["d1"], [2.0, -2.0, 0.0, 0.0])
    np.testing.assert_allclose(de.log2_fold_change["d2"], [0.0, 0.0, np.log2(3.0), 0.0])
    assert (de.fdr["d1"][:2] < 1e-3).all() and (de.fdr["d1"][2:] == 1.0).all()
    assert de.fdr["d2"][2] < 1e-3 and (np.delete(de.fdr["d2"], 2) == 1.0).all()
    np.testing.assert_array_equal(de.top_genes("d1"), [0, 1])  # |log2 FC| tie: lower gene index first
    np.testing.assert_array_equal(de.top_genes("d2"), [2])


def test_score_line_by_hand():
    scores = score_line(REAL, PRED, top_k=1)
    d1, d2 = scores["d1"], scores["d2"]
    # d1: real effect (3, -3, 0, 0), predicted (2, 4, 0, 0)
    assert d1["pearson_delta"] == pytest.approx(-6 / np.sqrt(18 * 11))
    assert d1["pearson_delta"] == pytest.approx(pearson([3, -3, 0, 0], [2, 4, 0, 0]))
    assert d1["mae"] == pytest.approx((1 + 7) / 4)
    assert d1["overlap_at_k"] == 1.0  # top real DE gene 0 (|log2 FC| 2), top predicted gene 0 (log2 3)
    assert d1["direction_match"] == 0.5  # gene 0 up in both, gene 1 down in real, up in the prediction
    assert d1["discrimination_l1"] == 1.0  # L1 to its own real effect 8, to d2's 10
    assert d1["real_de_genes"] == 2
    # d2: real effect (0, 0, 4, 0), predicted (3, -3, 1, 0)
    assert d2["pearson_delta"] == pytest.approx(3 / np.sqrt(12 * 18.75)) == pytest.approx(0.2)
    assert d2["mae"] == pytest.approx(9 / 4)
    assert d2["overlap_at_k"] == 0.0  # real DE {2}; predicted top gene 0 (|log2 FC| 2)
    assert d2["direction_match"] == 1.0  # the one real DE gene goes up in both
    assert d2["discrimination_l1"] == 0.5  # closer to d1's real effect (L1 1) than to its own (9)
    assert score_line(REAL, PRED, top_k=3)["d2"]["overlap_at_k"] == 0.0  # k capped at the 1 real DE gene
    # a perfect prediction scores 1 everywhere and 0 error; a no-effect prediction has no defined correlation
    perfect = score_line(REAL, REAL, top_k=2)["d1"]
    assert (perfect["pearson_delta"], perfect["mae"], perfect["overlap_at_k"], perfect["direction_match"]) == (
        pytest.approx(1.0),
        0.0,
        1.0,
        1.0,
    )
    none = score_line(REAL, LineCells(_rows([1, 4, 2, 2]), {k: _rows([1, 4, 2, 2]) for k in ("d1", "d2")}), 2)
    assert np.isnan(none["d1"]["pearson_delta"]) and none["d1"]["direction_match"] == 0.0
    with pytest.raises(ValueError, match="no cells for treatment 'd2'"):
        score_line(REAL, LineCells(PRED.control, {"d1": PRED.treated["d1"]}), 1)


def _random_line(rng, genes: int, shifts: dict[str, np.ndarray], n_treated: int = 12) -> LineCells:
    base = np.linspace(1, 8, genes)

    def cells(n, shift):  # fractional values (log-normalised-like): no ties, the Wilcoxon test is asymptotic
        return rng.poisson(base * np.exp(shift), size=(n, genes)) + rng.random((n, genes)) * 0.01

    return LineCells(cells(40, 0.0), {k: cells(n_treated, s) for k, s in shifts.items()})


@pytest.mark.slow
def test_matches_cell_eval(tmp_path):
    """Our numbers equal cell-eval's own (``pip install ddsc[cell-eval]``) on random data with partly wrong
    predictions: more real DE genes than k (the top-k cut matters) and some predicted directions flipped."""
    cell_eval = pytest.importorskip("cell_eval")
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(0)
    genes = 120
    up = np.r_[np.linspace(0.5, 1.5, 70), np.zeros(genes - 70)]
    shifts = {"d1": up, "d2": -up[::-1], "d3": np.zeros(genes)}
    flips = np.where(rng.random(genes) < 0.2, -1.0, 1.0)
    real = _random_line(rng, genes, shifts)
    pred = _random_line(rng, genes, {k: 0.6 * s * flips for k, s in shifts.items()})

    def anndata(cells: LineCells):
        keys = sorted(cells.treated)
        x = np.vstack([cells.control, *(cells.treated[k] for k in keys)]).astype(np.float32)
        labels = ["ctrl"] * len(cells.control) + [k for k in keys for _ in range(len(cells.treated[k]))]
        obs = pd.DataFrame({"target": labels}, index=[f"c{i}" for i in range(len(x))])
        return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(genes)]))

    evaluator = cell_eval.MetricsEvaluator(
        adata_pred=anndata(pred),
        adata_real=anndata(real),
        control_pert="ctrl",
        pert_col="target",
        num_threads=1,
        outdir=str(tmp_path),
        allow_discrete=True,  # keep our values as they are (no normalisation)
        pdex_kwargs={"is_log1p": False},  # fold changes of the values themselves, as ours
    )
    theirs = {
        row["perturbation"]: row for row in evaluator.compute(profile="full", write_csv=False)[0].iter_rows(named=True)
    }
    ours = score_line(real, pred, top_k=50)
    assert ours["d1"]["real_de_genes"] > 50 and 0 < ours["d1"]["direction_match"] < 1
    for key, mine in ours.items():
        ref = theirs[key]
        assert mine["pearson_delta"] == pytest.approx(ref["pearson_delta"], abs=1e-5)
        assert mine["mae"] == pytest.approx(ref["mae"], rel=1e-5)
        assert mine["overlap_at_k"] == pytest.approx(ref["overlap_at_50"])
        assert mine["discrimination_l1"] == pytest.approx(ref["discrimination_score_l1"])
        assert mine["real_de_genes"] == ref["de_nsig_counts_real"]
        if ref["de_direction_match"] is None:  # no real DE gene (d3)
            assert np.isnan(mine["direction_match"])
        else:
            assert mine["direction_match"] == pytest.approx(ref["de_direction_match"])
