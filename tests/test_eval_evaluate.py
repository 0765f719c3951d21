"""``evaluate`` end to end with denoisers whose answers are known, and the report it writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from ddsc.data.binning_config import BinningConfig
from ddsc.data.collator import CellCollator
from ddsc.data.labels import LabelVocab
from ddsc.diffusion.config import DiffusionConfig
from ddsc.diffusion.masked_diffusion import MaskedDiffusion
from ddsc.eval.cells import collate_cells
from ddsc.eval.evaluate import evaluate
from ddsc.eval.report import write_report
from ddsc.eval.settings import EvalSettings, SamplerSettings

K = 5
BINNING = BinningConfig(method="uniform", num_bins=K, max_count=50.0)
GENES = np.arange(3, 43)
COUNTS = np.random.default_rng(0).integers(1, 50, len(GENES))  # gene g always has the same count -> same bin


def _samples(n: int, seed: int, drug_shift: bool = False) -> list[dict]:
    """Cells express random gene subsets (all genes with drugs); a gene's count is fixed (doubled under d1)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        size = len(GENES) if drug_shift else int(rng.integers(8, 30))
        genes = np.sort(rng.choice(GENES, size=size, replace=False)).astype(np.int32)
        drug = ["DMSO_TF", "d1"][i % 2] if drug_shift else ""
        counts = COUNTS[genes - 3] * (2 if drug == "d1" else 1)
        out.append(
            {
                "cell_id": f"s{seed}-c{i}",
                "genes": genes,
                "counts": np.minimum(counts, 49).astype(np.int32),
                "cell_line_id": "L1" if drug_shift else "",
                "drug": drug,
            }
        )
    return out


class Oracle(nn.Module):
    """Puts (almost) all mass on the true bin of each gene, optionally per drug label: a perfect denoiser."""

    def __init__(self, table: torch.Tensor):  # [num drug ids, gene vocab] -> bin
        super().__init__()
        self.cfg = type("Cfg", (), {"num_bins": K, "time_conditioning": False})()
        self.register_buffer("table", table)

    def forward(self, gene_ids, expr, attention_mask, cond=None, t=None):
        drug = cond[:, -1] if cond is not None and cond.shape[1] else torch.zeros(len(gene_ids), dtype=torch.long)
        truth = self.table[drug[:, None], gene_ids]
        return 30.0 * nn.functional.one_hot(truth, K).float()


def _oracle(collator: CellCollator, samples: list[dict], drugs: int = 1) -> Oracle:
    cells = collate_cells(collator, samples)
    table = torch.zeros(drugs, 64, dtype=torch.long)
    drug_ids = cells.cond[:, -1] if cells.cond.shape[1] else np.zeros(len(cells), int)
    for d, genes, bins in zip(drug_ids, cells.genes, cells.bins, strict=True):
        assert np.all(table[d, genes].numpy()[table[d, genes].numpy() > 0] == bins[table[d, genes].numpy() > 0])
        table[d, genes] = torch.from_numpy(bins)
    return Oracle(table)


def test_evaluate_scores_model_and_baselines_on_the_same_masks(tmp_path):
    collator = CellCollator(max_length=64, binning=BINNING)
    train, test = _samples(60, seed=1), _samples(40, seed=2)
    diffusion = MaskedDiffusion(DiffusionConfig(), K)
    settings = EvalSettings(
        mask_rates=(0.3, 0.7),
        batch_size=16,
        knn_k=5,
        nelbo_points=4,
        generate_cells=20,
        max_genes=40,
        sampler=SamplerSettings(steps=8, batch_size=16),
    )
    oracle = _oracle(collator, train + test)
    metrics, arrays = evaluate(oracle, collator, diffusion, train, test, settings)
    for rate in ("0.3", "0.7"):
        m = metrics["masked"][rate]
        assert m["model"]["masked_acc"] == 1.0 and m["model"]["masked_ce"] < 1e-10
        assert m["model"]["num_masked"] == m["marginal"]["num_masked"] == m["knn"]["num_masked"] > 0
        # a gene's bin never varies, so the marginal's argmax is always right but its smoothing costs CE
        assert m["marginal"]["masked_acc"] == 1.0 and m["marginal"]["masked_ce"] > 0.01
        assert metrics["margins"][rate]["vs_marginal"] == pytest.approx(m["marginal"]["masked_ce"], abs=1e-9)
        np.testing.assert_array_equal(m["model"]["confusion"], m["marginal"]["confusion"])
        # the best baseline is the lowest-CE one, and the margin's interval brackets the margin
        margin = metrics["margins"][rate]
        baselines = ("marginal", "knn", "cell_histogram", "gene_cell_product")
        assert margin["best_baseline"] == min(baselines, key=lambda b: m[b]["masked_ce"])
        assert margin["vs_best"] == pytest.approx(m[margin["best_baseline"]]["masked_ce"])
        low, high = margin["vs_best_ci95"]
        assert 0 < low <= margin["vs_best"] <= high
        low, high = m["knn"]["masked_ce_ci95"]
        assert low <= m["knn"]["masked_ce"] <= high
        counts = metrics["imputation_counts"][rate]["scores"]
        assert set(counts) == {"model", *baselines, "gene_mean", "knn_mean"}
        assert counts["model"]["num_masked"] == m["model"]["num_masked"]
    assert metrics["masked"]["0.7"]["model"]["num_masked"] > metrics["masked"]["0.3"]["model"]["num_masked"]
    assert metrics["nelbo"]["nelbo"] < 1e-8
    # a perfect generator reproduces the held-out half exactly: generated == reference, metric by metric
    gen, ref = metrics["generation"]["generated"], metrics["generation"]["reference"]
    assert gen == pytest.approx(ref)
    assert arrays.pca["generated"].shape == arrays.pca["held_out"].shape == (20, arrays.pca["real"].shape[1])
    np.testing.assert_allclose(arrays.pca["generated"], arrays.pca["held_out"])
    assert metrics["generation"]["pca_fit_cells"] == 60  # the PCA is fitted on the train cells, not on A
    assert "perturbation" not in metrics  # no drug labels

    files = write_report(tmp_path, metrics, arrays)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["masked"]["0.3"]["knn"]["masked_ce"] == pytest.approx(metrics["masked"]["0.3"]["knn"]["masked_ce"])
    page = (tmp_path / "summary.md").read_text()
    for png in ("mask_rate.png", "calibration.png", "confusion.png", "pca.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in page
    best = metrics["margins"]["0.3"]["best_baseline"]
    assert best == "knn"  # a gene's bin never varies: kNN's votes all agree, on top of the (peaked) marginal
    assert f"| 0.3 | kNN (best baseline) | {metrics['masked']['0.3']['knn']['masked_ce']:.4f} [" in page
    assert len(files) == 6


def test_uniform_model_scores_log_k():
    """An untrained-style denoiser (all logits 0) has masked CE ln K whatever the mask."""
    collator = CellCollator(max_length=64, binning=BINNING)
    uniform = Oracle(torch.zeros(1, 64, dtype=torch.long))
    uniform.forward = lambda gene_ids, *a, **k: torch.zeros(*gene_ids.shape, K)
    settings = EvalSettings(mask_rates=(0.5,), nelbo_points=0, generate_cells=0, knn_k=3)
    metrics, _ = evaluate(
        uniform, collator, MaskedDiffusion(DiffusionConfig(), K), _samples(10, 1), _samples(5, 2), settings
    )
    assert metrics["masked"]["0.5"]["model"]["masked_ce"] == pytest.approx(np.log(K))
    assert metrics["masked"]["0.5"]["model"]["ece"] == pytest.approx(
        abs(0.2 - metrics["masked"]["0.5"]["model"]["masked_acc"])
    )
    assert "generation" not in metrics and "nelbo" not in metrics


def test_perturbation_recovers_a_drug_effect_the_model_knows():
    labels = LabelVocab({"cell_line_id": ["L1"], "drug": ["DMSO_TF", "d1"]})
    # 40 genes per cell, 16 per model row: perturbation scores whole cells, generated in chunks of 16
    collator = CellCollator(max_length=16, binning=BINNING, labels=labels, conditions=["cell_line_id", "drug"])
    train, test = _samples(40, seed=1, drug_shift=True), _samples(120, seed=2, drug_shift=True)
    oracle = _oracle(collator, train + test, drugs=3)
    settings = EvalSettings(
        mask_rates=(0.5,),
        nelbo_points=0,
        generate_cells=60,
        max_genes=40,
        top_k=10,
        min_group_cells=3,
        sampler=SamplerSettings(steps=4, batch_size=32),
    )
    metrics, arrays = evaluate(oracle, collator, MaskedDiffusion(DiffusionConfig(), K), train, test, settings)
    pert = metrics["perturbation"]
    assert pert["num_groups"] == 1
    scores = {name: p["mean"] for name, p in pert["predictors"].items()}
    # generated on control panels with d1 labels, the known effect (d1 doubles every count) is recovered exactly;
    # the other half of the real cells is identical (a gene's count is fixed), and so is the train mean of
    # treated cells (d1 is the only drug)
    for name in ("model", "real_half", "perturbation_mean"):
        assert scores[name]["pearson_delta"] == pytest.approx(1.0)
        assert scores[name]["mae"] == pytest.approx(0.0, abs=1e-12)
        assert scores[name]["direction_match"] == pytest.approx(1.0)
        assert scores[name]["overlap_at_k"] == pytest.approx(1.0)
    # the control mean predicts no effect: no correlation is defined, no direction matches, and its error is
    # the effect itself: mean over genes of |bin(2c) - bin(c)|, bins of width 10 counts (uniform on [0, 50])
    assert np.isnan(scores["control_mean"]["pearson_delta"])
    assert scores["control_mean"]["direction_match"] == 0.0
    moved = np.minimum(COUNTS * 2, 49) // 10 - COUNTS // 10
    assert scores["control_mean"]["mae"] == pytest.approx(np.abs(moved).mean())
    np.testing.assert_allclose(arrays.delta_generated, arrays.delta_real)
    assert arrays.delta_real.shape == arrays.delta_generated.shape == (40,)
