"""Known drug effects: the demo's saved ground truth is found and read, and a denoiser that knows (or inverts)
the effect scores delta Pearson +1 (or -1) against it; the real treated cells score +1 as the reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ddsc.data.binning_config import BinningConfig
from ddsc.data.collator import CellCollator
from ddsc.data.demo_data import DemoSpec, make_demo_data
from ddsc.data.labels import LabelVocab
from ddsc.diffusion.config import DiffusionConfig
from ddsc.diffusion.masked_diffusion import MaskedDiffusion
from ddsc.eval.evaluate import evaluate
from ddsc.eval.ground_truth import DrugEffects, find_ground_truth
from ddsc.eval.report import write_report
from ddsc.eval.settings import EvalSettings, SamplerSettings

K = 5
BINNING = BinningConfig(method="uniform", num_bins=K, max_count=50.0)  # bin = count // 10
GENES = np.arange(3, 43)
UP, DOWN = GENES[:10], GENES[10:20]  # d1 raises genes 3..12 by one bin and lowers 13..22 by one
CONDITIONS = ["cell_line_id", "dose", "drug"]
LABELS = LabelVocab({"cell_line_id": ["L1", "L2"], "dose": ["0", "1"], "drug": ["DMSO_TF", "d1"]})


def test_demo_ground_truth_is_found_and_read(tmp_path):
    spec = DemoSpec(
        cells=40, genes=30, cell_lines=2, drugs=2, doses=(0.5, 5.0), plates=1, shards=1, programs=4, genes_per_program=5
    )
    make_demo_data(tmp_path / "tahoe", spec)
    mds = tmp_path / "mds"
    mds.mkdir()
    (mds / "labels.json").write_text(json.dumps({"cell_line_id": ["CVCL_DM00", "CVCL_DM01"], "drug": ["DMSO_TF"]}))
    assert find_ground_truth(mds) is None  # the demo's drugs are not this dataset's labels
    drugs = ["DMSO_TF", "demodrug_a", "demodrug_b"]
    (mds / "labels.json").write_text(json.dumps({"cell_line_id": ["CVCL_DM00", "CVCL_DM01"], "drug": drugs}))
    folder = find_ground_truth(mds)
    assert folder == tmp_path / "tahoe" / "ground_truth"
    truth = DrugEffects.load(folder)
    assert truth.effect.shape == (2, 3, 2, 30) and truth.drugs == drugs and truth.doses == ["0.5", "5"]
    np.testing.assert_array_equal(truth.gene_ids, np.arange(3, 33))
    assert np.all(truth.effect[:, 0] == 0) and np.abs(truth.effect[:, 1:]).max() > 0.1
    # the effect grows with dose (a Hill curve): same sign, larger magnitude at 5 than at 0.5
    moved = truth.effect[:, 1:, 0] != 0
    assert np.all(np.abs(truth.effect[:, 1:, 1][moved]) > np.abs(truth.effect[:, 1:, 0][moved]))
    np.testing.assert_array_equal(truth.gene_columns(np.array([3, 32, 40])), [0, 29, -1])
    with pytest.raises(FileNotFoundError, match="not a ground-truth folder"):
        DrugEffects.load(tmp_path)


def _samples(per_group: int) -> list[dict]:
    """Both lines, controls (dose 0) and d1 at dose 1; every cell has all 40 genes at count 25 (bin 2), and
    under d1 the UP genes at 35 (bin 3) and the DOWN genes at 15 (bin 1)."""
    out = []
    for line in ("L1", "L2"):
        for drug, dose in (("DMSO_TF", "0"), ("d1", "1")):
            counts = np.full(len(GENES), 25)
            if drug == "d1":
                counts[np.isin(GENES, UP)], counts[np.isin(GENES, DOWN)] = 35, 15
            for i in range(per_group):
                out.append(
                    {
                        "cell_id": f"{line}-{drug}-{i}",
                        "genes": GENES.astype(np.int32),
                        "counts": counts.astype(np.int32),
                        "cell_line_id": line,
                        "drug": drug,
                        "dose": dose,
                    }
                )
    return out


class DrugOracle(nn.Module):
    """Puts all mass on ``table[drug id, gene]``: a denoiser whose drug response is known exactly."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.cfg = type("Cfg", (), {"num_bins": K, "time_conditioning": False})()
        self.register_buffer("table", table)

    def forward(self, gene_ids, expr, attention_mask, cond=None, t=None):
        return 30.0 * nn.functional.one_hot(self.table[cond[:, -1][:, None], gene_ids], K).float()


def _truth_folder(root: Path) -> Path:
    """Ground truth in the demo's file format: d1 moves UP by +1 (L1) / +2 (L2) nats and DOWN by -1 / -2."""
    effect = np.zeros((2, 2, 1, len(GENES)))
    for li, scale in enumerate((1.0, 2.0)):
        effect[li, 1, 0, np.isin(GENES, UP)], effect[li, 1, 0, np.isin(GENES, DOWN)] = scale, -scale
    folder = root / "ground_truth"
    folder.mkdir()
    np.savez(folder / "effects.npz", effect=effect, gene_token_ids=GENES)
    axes = {"cell_line_id": ["L1", "L2"], "drug": ["DMSO_TF", "d1"], "dose": ["1"]}
    (folder / "conditions.json").write_text(json.dumps({"axes": axes}))
    return folder


@pytest.mark.parametrize("direction", [1, -1])
def test_generated_effect_against_ground_truth(tmp_path, direction):
    collator = CellCollator(max_length=16, binning=BINNING, labels=LABELS, conditions=CONDITIONS)
    table = torch.zeros(3, 64, dtype=torch.long)  # drug id 0 null, 1 DMSO_TF, 2 d1
    table[:, GENES] = 2
    table[2, UP], table[2, DOWN] = 2 + direction, 2 - direction
    settings = EvalSettings(
        mask_rates=(0.5,),
        nelbo_points=0,
        generate_cells=0,
        knn_k=3,
        ground_truth=str(_truth_folder(tmp_path)),
        truth_control_cells=4,
        sampler=SamplerSettings(steps=4, batch_size=16),
    )
    samples = _samples(per_group=6)
    metrics, arrays = evaluate(
        DrugOracle(table), collator, MaskedDiffusion(DiffusionConfig(), K), samples, samples, settings
    )
    known = metrics["ground_truth"]
    assert known["control_cells"] == 8 and known["panels"] == 8 * 3  # 40 genes -> chunks of <= 16
    gen, ref = known["generated"], known["reference"]
    assert sorted(gen["groups"]) == ["L1|d1|1", "L2|d1|1"] and gen["num_groups"] == ref["num_groups"] == 2
    for group in gen["groups"].values():
        assert group["delta_pearson"] == pytest.approx(direction)
        assert group["num_genes"] == 40 and group["num_strong_genes"] == 20
        assert group["sign_agreement_strong"] == (1.0 if direction == 1 else 0.0)
    assert gen["mean_delta_pearson"] == pytest.approx(direction) and gen["by_dose"] == {"1": pytest.approx(direction)}
    assert ref["mean_delta_pearson"] == pytest.approx(1.0)  # real d1 cells vs real controls
    # scatter arrays: per group the true effect and the generated bin delta on the same 40 genes
    np.testing.assert_allclose(np.sign(arrays.truth_generated), direction * np.sign(arrays.truth_effect))
    assert arrays.truth_effect.shape == (80,)

    write_report(tmp_path / "report", metrics, arrays)
    page = (tmp_path / "report" / "summary.md").read_text()
    assert "## Known drug effects" in page and "](ground_truth_scatter.png)" in page
    assert f"| mean delta Pearson | {direction:.4f} | 1.0000 |" in page


def test_model_without_drug_condition_is_reported_as_skipped(tmp_path):
    collator = CellCollator(max_length=64, binning=BINNING)
    table = torch.full((1, 64), 2, dtype=torch.long)
    oracle = DrugOracle(table)
    oracle.forward = lambda gene_ids, *a, **k: 30.0 * nn.functional.one_hot(table[0][gene_ids], K).float()
    settings = EvalSettings(
        mask_rates=(0.5,), nelbo_points=0, generate_cells=0, knn_k=3, ground_truth=str(_truth_folder(tmp_path))
    )
    samples = _samples(per_group=2)
    metrics, _ = evaluate(oracle, collator, MaskedDiffusion(DiffusionConfig(), K), samples, samples, settings)
    assert metrics["ground_truth"]["skipped"].startswith("the model has no drug condition")
