"""Known drug effects: the demo's saved ground truth is found and read; a denoiser that knows (or inverts)
the effect scores delta Pearson +1 (or -1) against it, the real treated cells +1 as the reference; the
expected-bin estimator returns a hand-computed value; and an oracle that knows the demo's true expression
profiles scores like a large real-data reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from ddsc.data.binning import bin_counts
from ddsc.data.binning_config import BinningConfig
from ddsc.data.collator import CellCollator
from ddsc.data.demo_data import CONTROL, DemoSpec, draw_counts, make_demo_data
from ddsc.data.labels import LabelVocab
from ddsc.data.tahoe import parse_drugname_drugconc
from ddsc.data.tokens import ExpressionTokens
from ddsc.diffusion.config import DiffusionConfig
from ddsc.diffusion.masked_diffusion import MaskedDiffusion
from ddsc.eval.cell_models import MaskedCellModel
from ddsc.eval.cells import collate_cells, fresh_collator, split_into_panels
from ddsc.eval.drug_effects import DrugEffects, find_ground_truth
from ddsc.eval.evaluate import evaluate
from ddsc.eval.ground_truth import ground_truth_eval
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
    ref = known["reference"]
    assert known["sampled_control_cells"] == 8 and known["sampled_panels"] == 24  # 4 per line: all of them
    for gen in (known["expected"], known["generated"]):  # a one-hot oracle: expected and sampled bins agree
        assert sorted(gen["groups"]) == ["L1|d1|1", "L2|d1|1"] and gen["num_groups"] == ref["num_groups"] == 2
        for group in gen["groups"].values():
            assert group["delta_pearson"] == pytest.approx(direction)
            assert group["num_genes"] == 40 and group["num_strong_genes"] == 20
            assert group["sign_agreement_strong"] == (1.0 if direction == 1 else 0.0)
        assert gen["mean_delta_pearson"] == pytest.approx(direction)
        assert gen["by_dose"] == {"1": pytest.approx(direction)}
    assert ref["mean_delta_pearson"] == pytest.approx(1.0)  # real d1 cells vs real controls
    # scatter arrays: per group the true effect and the expected-bin delta on the same 40 genes
    np.testing.assert_allclose(np.sign(arrays.truth_generated), direction * np.sign(arrays.truth_effect))
    assert arrays.truth_effect.shape == (80,)

    write_report(tmp_path / "report", metrics, arrays)
    page = (tmp_path / "report" / "summary.md").read_text()
    assert "## Known drug effects" in page and "](ground_truth_scatter.png)" in page
    assert f"| mean delta Pearson | {direction:.4f} | {direction:.4f} | 1.0000 |" in page


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


class SoftDrugModel(nn.Module):
    """Known bin distributions: bin 2 for every gene, except under d1 UP genes (bins 2 / 3 at 1/2 each:
    mean 2.5) and DOWN genes (bins 1 / 2 at 1/4, 3/4: mean 1.75). Refuses input that is not fully masked."""

    def __init__(self):
        super().__init__()
        self.cfg = type("Cfg", (), {"num_bins": K, "time_conditioning": False})()
        probs = torch.zeros(3, 64, K)  # drug id 0 null, 1 DMSO_TF, 2 d1
        probs[:, :, 2] = 1.0
        probs[2, UP] = torch.tensor([0.0, 0.0, 0.5, 0.5, 0.0])
        probs[2, DOWN] = torch.tensor([0.0, 0.25, 0.75, 0.0, 0.0])
        self.register_buffer("log_probs", probs.clamp(min=1e-30).log())

    def forward(self, gene_ids, expr, attention_mask, cond=None, t=None):
        real = gene_ids >= 3
        assert torch.all(expr[real] == ExpressionTokens(K).mask) and torch.all(t == 1.0)
        return self.log_probs[cond[:, -1][:, None], gene_ids]


def test_expected_bins_is_the_models_conditional_mean(tmp_path):
    collator = CellCollator(max_length=16, binning=BINNING, labels=LABELS, conditions=CONDITIONS)
    samples = _samples(per_group=3)
    controls = collate_cells(fresh_collator(collator, 0, max_length=1 << 20), samples[:3])
    panels = split_into_panels(controls, 16, seed=0)
    cond = panels.cond.copy()
    cond[:, -1] = LABELS.encode("drug", ["d1"])[0]
    got = MaskedCellModel(SoftDrugModel(), ExpressionTokens(K), SamplerSettings(batch_size=5)).expected(panels, cond)
    for genes, mean in zip(panels.genes, got, strict=True):
        want = np.where(np.isin(genes, UP), 2.5, np.where(np.isin(genes, DOWN), 1.75, 2.0))
        np.testing.assert_allclose(mean, want, atol=1e-9)

    truth = DrugEffects.load(_truth_folder(tmp_path))
    soft = MaskedCellModel(SoftDrugModel(), ExpressionTokens(K), SamplerSettings(batch_size=8))
    metrics, true, delta = ground_truth_eval(soft, collator, _samples(per_group=6), truth, sampled_control_cells=0)
    # per gene: delta +0.5 (UP), -0.25 (DOWN), 0 (rest) against effects +s, -s, 0 (s = 1, 2 by cell line)
    want_delta = np.where(np.isin(GENES, UP), 0.5, np.where(np.isin(GENES, DOWN), -0.25, 0.0))
    want = np.corrcoef(want_delta, np.where(np.isin(GENES, UP), 1.0, np.where(np.isin(GENES, DOWN), -1.0, 0.0)))[0, 1]
    expected = metrics["expected"]
    # by hand: cov = (10 * 0.5 + 10 * 0.25) / 40, var(delta) = 3.125 / 40 - 0.0625^2, var(effect) = 0.5
    assert want == pytest.approx(0.1875 / np.sqrt((3.125 / 40 - 0.0625**2) * 0.5))
    assert expected["mean_delta_pearson"] == pytest.approx(want, abs=1e-6)
    assert expected["mean_sign_agreement_strong"] == 1.0 and metrics["generated"]["num_groups"] == 0
    np.testing.assert_allclose(np.sort(delta), np.sort(np.tile(want_delta, 2)), atol=1e-9)
    assert true.shape == (80,)


# ---------------------------------------------------------------- an oracle of the demo's true profiles

ORACLE_BINS = BinningConfig(method="quantile", num_bins=11)
K_ORACLE = ORACLE_BINS.num_bins
ORACLE_SPEC = DemoSpec(
    cells=2400,
    genes=300,
    cell_lines=2,
    drugs=2,
    plates=1,
    shards=1,
    programs=8,
    genes_per_program=30,
    programs_per_drug=2,
    seed=3,
)


def _demo_samples(root: Path) -> list[dict]:
    """MDS-style samples straight from the demo's Tahoe shards (markers stripped, dose from sample metadata)."""
    doses = {
        r["sample"]: parse_drugname_drugconc(r["drugname_drugconc"])[1]
        for r in pq.read_table(root / "sample_metadata.parquet").to_pylist()
    }
    rows = pq.read_table(sorted((root / "data").glob("*.parquet"))).to_pylist()
    return [
        {
            "cell_id": f"cell{i}",
            "genes": np.asarray(r["genes"][1:], np.int32),
            "counts": np.asarray(r["expressions"][1:], np.int32),
            "cell_line_id": r["cell_line_id"],
            "drug": r["drug"],
            "dose": doses[r["sample"]],
        }
        for i, r in enumerate(rows)
    ]


class ProfileOracle(nn.Module):
    """Knows the true expected profile of every (cell line, drug, dose): its bin distribution of a gene is the
    histogram of that gene's quantile bin (given it is expressed) in many cells drawn from that profile."""

    def __init__(self, root: Path, labels: LabelVocab, cells: int = 1500):
        super().__init__()
        self.cfg = type("Cfg", (), {"num_bins": ORACLE_BINS.num_bins, "time_conditioning": False})()
        truth = DrugEffects.load(root / "ground_truth")
        profile = np.load(root / "ground_truth" / "effects.npz")["expected_profile"].astype(np.float64)
        rng = np.random.default_rng(0)
        ids = {c: len(labels.labels[c]) + 1 for c in CONDITIONS}
        table = torch.zeros(ids["cell_line_id"], ids["dose"], ids["drug"], truth.gene_ids.max() + 1, K_ORACLE)
        for li, line in enumerate(truth.cell_lines):
            for di, drug in enumerate(truth.drugs):
                for ci, dose in enumerate(["0"] if drug == CONTROL else truth.doses):
                    counts = torch.from_numpy(draw_counts(ORACLE_SPEC, np.tile(profile[li, di, ci], (cells, 1)), rng))
                    bins = bin_counts(counts, counts > 0, ORACLE_BINS)
                    hist = torch.stack([((bins == b) & (counts > 0)).sum(0) for b in range(K_ORACLE)], -1) + 0.01
                    index = [labels.encode(c, [v])[0] for c, v in zip(CONDITIONS, (line, dose, drug), strict=True)]
                    table[index[0], index[1], index[2], truth.gene_ids] = hist.float()
        self.register_buffer("log_table", (table + 1e-3).log())

    def forward(self, gene_ids, expr, attention_mask, cond=None, t=None):
        return self.log_table[cond[:, 0, None], cond[:, 1, None], cond[:, 2, None], gene_ids]


def test_oracle_of_the_true_profiles_scores_like_the_real_data(tmp_path):
    make_demo_data(tmp_path, ORACLE_SPEC)
    samples = _demo_samples(tmp_path)
    labels = LabelVocab({c: sorted({s[c] for s in samples}) for c in CONDITIONS})
    collator = CellCollator(max_length=64, binning=ORACLE_BINS, labels=labels, conditions=CONDITIONS)
    truth = DrugEffects.load(tmp_path / "ground_truth")
    settings = SamplerSettings(batch_size=64)
    oracle_model = MaskedCellModel(ProfileOracle(tmp_path, labels), ExpressionTokens(K_ORACLE), settings)
    metrics, _, _ = ground_truth_eval(oracle_model, collator, samples, truth, sampled_control_cells=0)
    oracle, real = metrics["expected"], metrics["reference"]  # reference: all 2400 real cells (~130 per group)
    assert oracle["num_groups"] == real["num_groups"] == 2 * 2 * 3
    top = truth.doses[-1]
    assert real["by_dose"][top] > 0.6 and oracle["by_dose"][top] > 0.6
    # where effects are large the ~130 real cells per group measure the same thing as the oracle's profiles ...
    assert abs(oracle["by_dose"][top] - real["by_dose"][top]) < 0.08
    # ... and at every dose the noise-free oracle scores at least as high as the finite real data
    assert all(oracle["by_dose"][d] > real["by_dose"][d] - 0.02 for d in truth.doses)


# ---------------------------------------------------------------- unseen drugs and doses (molecule models)


def test_held_out_drugs_splits_and_baselines(tmp_path):
    from ddsc.eval.ground_truth import _by_split, _score, treatment_cond
    from ddsc.eval.report import _fmt, _split_section
    from ddsc.model.conditions import VALUE, ZERO
    from ddsc.model.config import ConditionConfig

    spec = DemoSpec(cells=200, genes=40, cell_lines=1, drugs=4, shards=1, programs=4, genes_per_program=10)
    make_demo_data(tmp_path / "tahoe", DemoSpec(**{**spec.__dict__, "held_out_drugs": 1, "held_out_dose": 0.5}))
    truth = DrugEffects.load(tmp_path / "tahoe" / "ground_truth")
    (unseen,) = truth.held_out_drugs
    seen = [d for d in truth.drugs[1:] if d != unseen]
    assert truth.split(seen[0], "5") == "seen" and truth.split(unseen, "5") == "unseen_drug"
    assert truth.split(seen[0], "0.5") == "unseen_dose" and truth.split(unseen, "0.5") == "unseen_drug_and_dose"
    mds = tmp_path / "mds"
    mds.mkdir()
    (mds / "labels.json").write_text(json.dumps({"cell_line_id": truth.cell_lines, "drug": [CONTROL, *seen]}))
    assert find_ground_truth(mds) == tmp_path / "tahoe" / "ground_truth"  # held-out drugs need no label

    # a molecule model is asked for the held-out drug by its SMILES and for the held-out dose by its value; a
    # label model cannot be asked for a drug it has no label for
    labels = LabelVocab({"drug": [CONTROL, *seen], "dose": ["0", "0.05", "5"]})
    molecule = CellCollator(
        8,
        BinningConfig(num_bins=K),
        labels,
        [ConditionConfig("smiles", kind="molecule", column="canonical_smiles"), ConditionConfig("dose", kind="scalar")],
    )
    cond = treatment_cond(molecule, np.zeros((2, 2051), np.float32), unseen, "0.5", truth)
    assert cond[:, 0].tolist() == [VALUE, VALUE] and cond[0, 1:2049].sum() > 10
    np.testing.assert_allclose(cond[:, -2:], [[VALUE, np.log10(0.5)]] * 2, rtol=1e-6)
    assert treatment_cond(molecule, cond, CONTROL, "0", truth)[0, -2] == ZERO
    label = CellCollator(8, BinningConfig(num_bins=K), labels, ["drug", "dose"])
    assert treatment_cond(label, np.zeros((2, 2), np.int64), unseen, "5", truth) is None
    assert treatment_cond(label, np.zeros((2, 2), np.int64), seen[0], "0.5", truth) is None  # no label for 0.5
    assert treatment_cond(label, np.zeros((2, 2), np.int64), seen[1], "5", truth).tolist() == [[3, 3]] * 2

    # baselines: a model whose delta for each seen drug is its true effect plus noise, and for the unseen one the
    # effect of another drug; nearest-drug and mean baselines are scored on the model's own seen-drug deltas,
    # their ceilings on the seen drugs' true effects
    line, genes, counts = truth.cell_lines[0], truth.gene_ids, np.full(40, 10)
    effect = {d: truth.effect[0, truth.drugs.index(d), truth.doses.index("5")] for d in truth.drugs}
    noise = np.random.default_rng(0).normal(0.0, 0.5, (len(seen), 40))
    model = {d: effect[d] + n for d, n in zip(seen, noise, strict=True)}
    deltas = {f"{line}|{d}|5": (genes, model[d], counts) for d in seen}
    deltas[f"{line}|{unseen}|5"] = (genes, effect[seen[2]], counts)
    scores = {k: _score(truth, *v, effect[k.split("|")[1]], 3) for k, v in deltas.items()}
    out = _by_split(scores, deltas, truth, 3)
    assert out["by_split"]["seen"]["num_groups"] == 3
    assert out["by_split"]["seen"]["mean_delta_pearson"] < 0.99
    base = out["baselines"]
    nearest = base["nearest_seen_drug_of"][unseen]
    assert base["unseen_drug_groups"] == 1 and nearest in seen
    pearson = lambda a, b: float(np.corrcoef(a, b)[0, 1])  # noqa: E731
    assert base["model_mean_delta_pearson"] == pytest.approx(pearson(effect[seen[2]], effect[unseen]))
    for name, by_drug in (("", model), ("ceiling_", effect)):
        mean = np.mean([by_drug[d] for d in seen], axis=0)
        assert base[f"{name}nearest_seen_drug_mean_delta_pearson"] == pytest.approx(
            pearson(by_drug[nearest], effect[unseen])
        )
        assert base[f"{name}mean_seen_drugs_mean_delta_pearson"] == pytest.approx(pearson(mean, effect[unseen]))
    assert base["by_unseen_drug"][unseen] == {
        k[: -len("_mean_delta_pearson")]: v for k, v in base.items() if k.endswith("_mean_delta_pearson")
    }
    row = [line for line in _split_section(out) if line.startswith(f"| {unseen} |")]
    assert row == [
        f"| {unseen} | {_fmt(base['model_mean_delta_pearson'])} | {_fmt(base['nearest_seen_drug_mean_delta_pearson'])} "
        f"| {_fmt(base['mean_seen_drugs_mean_delta_pearson'])} | "
        f"{_fmt(base['ceiling_nearest_seen_drug_mean_delta_pearson'])} / "
        f"{_fmt(base['ceiling_mean_seen_drugs_mean_delta_pearson'])} |"
    ]
    assert base["ceiling_nearest_seen_drug_mean_delta_pearson"] != pytest.approx(
        base["nearest_seen_drug_mean_delta_pearson"], abs=1e-3
    )
