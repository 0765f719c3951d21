"""Perturbation metrics in the field's terms: the cell-eval / Virtual Cell Challenge definitions, in numpy.

A perturbation *group* is a (cell line, drug[, dose]) treatment; each is compared with the control cells
(``DMSO_TF``) of its cell line. A predictor supplies, per cell line, its control cells and its treated cells
per treatment (:class:`LineCells`); the real data supply the same. Definitions follow cell-eval 0.6.8
(``cell_eval.metrics``, the Virtual Cell Challenge scorer) with DE from pdex 0.1.28, the test cell-eval runs
(``tests/test_eval_perturbation.py`` checks these numbers against cell-eval itself when it is installed,
``pip install ddsc[cell-eval]``):

- ``pearson_delta``: Pearson over genes of (mean treated - mean control), predicted vs real, each with its
  own controls (``cell_eval.metrics.pearson_delta``).
- ``mae``: mean over genes of |predicted - real| mean treated expression (``cell_eval.metrics.mae``).
- DE genes: per gene a two-sided Mann-Whitney U (Wilcoxon rank-sum) test with continuity correction of
  treated vs control cells (scipy's ``method="auto"``, as pdex calls it), Benjamini-Hochberg FDR over all
  (treatment, gene) tests of the cell line (cell-eval runs per cell type), FDR < 0.05; fold change = mean
  treated / mean control, 20 when only the control mean is 0, 1/20 when only the treated mean is 0, 1 when
  both are (pdex's ``clip_value``, ``is_log1p=False``: values here are bins, not log counts).
- ``overlap_at_k``: |top k real DE genes & top k predicted DE genes| / min(k, number of real DE genes), genes
  ranked by |log2 fold change| (``cell_eval.metrics.de_overlap_metric``, ``overlap_at_N`` for N = k); 0
  when the real group has no DE gene.
- ``direction_match``: over the real DE genes, the fraction whose predicted log2 fold change has the same sign
  (``DEDirectionMatch``); NaN when the real group has no DE gene.
- ``discrimination_l1``: 1 - rank / n of the group's own real effect among the n real effects of its cell
  line, by L1 distance to the predicted effect (``discrimination_score``, metric ``l1``): 1 = the prediction
  is closest to its own group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import false_discovery_control, mannwhitneyu

from ddsc.eval.metrics import pearson

FDR = 0.05
FOLD_CHANGE_CLIP = 20.0
METRICS = ("pearson_delta", "mae", "overlap_at_k", "direction_match", "discrimination_l1")


@dataclass
class LineCells:
    """One cell line's cells as dense rows over the same genes: controls, and treated cells per treatment."""

    control: np.ndarray  # [cells, genes]
    treated: dict[str, np.ndarray]  # treatment key -> [cells, genes]


@dataclass
class DEResult:
    """Per treatment of one cell line: log2 fold change and FDR per gene."""

    log2_fold_change: dict[str, np.ndarray]
    fdr: dict[str, np.ndarray]

    def top_genes(self, treatment: str) -> np.ndarray:
        """DE genes (FDR < 0.05) by decreasing |log2 fold change| (ties: lower gene index first)."""
        sig = np.flatnonzero(self.fdr[treatment] < FDR)
        return sig[np.argsort(-np.abs(self.log2_fold_change[treatment][sig]), kind="stable")]


def fold_change(treated_mean: np.ndarray, control_mean: np.ndarray) -> np.ndarray:
    """mean treated / mean control with pdex's clipping of zero means."""
    t, c = np.asarray(treated_mean, np.float64), np.asarray(control_mean, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = t / c
    ratio = np.where(c == 0, FOLD_CHANGE_CLIP, ratio)
    ratio = np.where(t == 0, 1.0 / FOLD_CHANGE_CLIP, ratio)
    return np.where((t == 0) & (c == 0), 1.0, ratio)


def differential_expression(cells: LineCells) -> DEResult:
    """Wilcoxon DE of every treatment against the line's controls, FDR over all the line's tests."""
    keys = sorted(cells.treated)
    control = np.asarray(cells.control, np.float64)
    log2fc, pvalues = {}, []
    for key in keys:
        treated = np.asarray(cells.treated[key], np.float64)
        log2fc[key] = np.log2(fold_change(treated.mean(0), control.mean(0)))
        with np.errstate(invalid="ignore", divide="ignore"):
            p = mannwhitneyu(treated, control, use_continuity=True, alternative="two-sided", axis=0).pvalue
        pvalues.append(np.where(np.isnan(p), 1.0, p))  # constant genes: no test, p = 1 (as pdex)
    flat = false_discovery_control(np.concatenate(pvalues), method="bh") if keys else np.zeros(0)
    fdr = dict(zip(keys, np.split(flat, np.cumsum([len(p) for p in pvalues])[:-1]), strict=True))
    return DEResult(log2fc, fdr)


def overlap_at_k(real: DEResult, pred: DEResult, treatment: str, k: int) -> float:
    top_real, top_pred = real.top_genes(treatment), pred.top_genes(treatment)
    k_eff = min(k, len(top_real))
    return len(np.intersect1d(top_real[:k_eff], top_pred[:k_eff])) / k_eff if k_eff else 0.0


def direction_match(real: DEResult, pred: DEResult, treatment: str) -> float:
    sig = real.fdr[treatment] < FDR
    if not sig.any():
        return float("nan")
    same = np.sign(real.log2_fold_change[treatment][sig]) == np.sign(pred.log2_fold_change[treatment][sig])
    return float(same.mean())


def effect(cells: LineCells, treatment: str) -> np.ndarray:
    return cells.treated[treatment].mean(0) - cells.control.mean(0)


def discrimination_l1(real: LineCells, pred: LineCells, treatment: str) -> float:
    keys = sorted(real.treated)
    distances = np.array([np.abs(effect(real, key) - effect(pred, treatment)).sum() for key in keys])
    rank = int(np.flatnonzero(np.argsort(distances, kind="stable") == keys.index(treatment))[0])
    return 1.0 - rank / len(keys)


def score_line(real: LineCells, pred: LineCells, top_k: int) -> dict[str, dict[str, float]]:
    """Every metric per treatment of one cell line (``pred`` must cover the treatments of ``real``)."""
    missing = sorted(set(real.treated) - set(pred.treated))
    if missing:
        raise ValueError(f"the prediction has no cells for treatment {missing[0]!r}")
    de_real, de_pred = (
        differential_expression(real),
        differential_expression(LineCells(pred.control, {key: pred.treated[key] for key in real.treated})),
    )
    return {
        key: {
            "pearson_delta": pearson(effect(pred, key), effect(real, key)),
            "mae": float(np.abs(pred.treated[key].mean(0) - real.treated[key].mean(0)).mean()),
            "overlap_at_k": overlap_at_k(de_real, de_pred, key, top_k),
            "direction_match": direction_match(de_real, de_pred, key),
            "discrimination_l1": discrimination_l1(real, pred, key),
            "real_de_genes": int((de_real.fdr[key] < FDR).sum()),
        }
        for key in sorted(real.treated)
    }
