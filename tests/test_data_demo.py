"""The synthetic Tahoe-format demo data: layout, and counts that follow the saved ground truth."""

from __future__ import annotations

import ast
import json

import numpy as np
import pyarrow.parquet as pq

from ddsc.data.demo_data import CONTROL, DemoSpec, make_demo_data, make_demo_data_once
from ddsc.data.tahoe import REQUIRED_COLUMNS
from ddsc.done import MARKER

SPEC = DemoSpec(
    cells=3000,
    genes=200,
    cell_lines=2,
    drugs=2,
    shards=2,
    programs=6,
    genes_per_program=30,
    programs_per_drug=3,
    seed=1,
)


def test_layout_and_ground_truth(tmp_path):
    make_demo_data(tmp_path, SPEC)
    shards = sorted((tmp_path / "data").glob("*.parquet"))
    assert [p.name for p in shards] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    table = pq.read_table(shards)
    assert set(REQUIRED_COLUMNS) <= set(table.column_names) and table.num_rows == SPEC.cells
    genes_meta = pq.read_table(tmp_path / "gene_metadata.parquet").to_pydict()
    assert min(genes_meta["token_id"]) == 3 and len(set(genes_meta["token_id"])) == SPEC.genes
    samples = {
        r["sample"]: ast.literal_eval(r["drugname_drugconc"])[0]
        for r in pq.read_table(tmp_path / "sample_metadata.parquet").to_pylist()
    }
    truth = np.load(tmp_path / "ground_truth" / "effects.npz", allow_pickle=False)
    conditions = json.loads((tmp_path / "ground_truth" / "conditions.json").read_text())
    lines, drugs = conditions["axes"]["cell_line_id"], conditions["axes"]["drug"]
    effect, profile = truth["effect"], truth["expected_profile"]
    assert effect.shape == (SPEC.cell_lines, SPEC.drugs + 1, len(SPEC.doses), SPEC.genes)
    assert np.all(effect[:, drugs.index(CONTROL)] == 0)
    # drug effects grow with dose, gene by gene
    assert np.all(np.abs(effect[:, 1:, 1:]) >= np.abs(effect[:, 1:, :-1]) - 1e-6)
    assert np.abs(effect[:, 1:, -1]).max() > 0.5
    # every drug moves exactly programs_per_drug programs, by the spec's ranges, and the saved effect is
    # sensitivity * Hill(dose) * (drug programs @ membership), recomputed here from the saved terms
    programs = truth["drug_program"][1:]
    assert np.all((programs != 0).sum(axis=1) == SPEC.programs_per_drug)
    moved = np.abs(programs[programs != 0])
    assert moved.min() >= SPEC.drug_effect[0] and moved.max() <= SPEC.drug_effect[1]
    assert np.all(truth["member"].sum(axis=1) == SPEC.genes_per_program)
    sens, ec50 = truth["sensitivity"][:, 1:], truth["ec50"][1:]
    assert sens.min() >= SPEC.sensitivity[0] and sens.max() <= SPEC.sensitivity[1]
    assert ec50.min() >= SPEC.ec50[0] and ec50.max() <= SPEC.ec50[1]
    hill = truth["doses"][None, :] / (truth["doses"][None, :] + ec50[:, None])
    want = sens[:, :, None, None] * hill[None, :, :, None] * (programs @ truth["member"])[None, :, None, :]
    np.testing.assert_allclose(effect[:, 1:], want, rtol=1e-5, atol=1e-6)

    rows = table.select(["genes", "expressions", "drug", "sample", "cell_line_id"]).to_pylist()
    doses = [float(d) for d in conditions["axes"]["dose"]]
    sums: dict[tuple, np.ndarray] = {}
    for row in rows:
        drug, conc, unit = samples[row["sample"]]
        assert drug == row["drug"] and unit == "uM" and row["genes"][0] == 1 and row["expressions"][0] == -2
        key = (lines.index(row["cell_line_id"]), drugs.index(drug), doses.index(conc) if drug != CONTROL else 0)
        x = sums.setdefault(key, np.zeros(SPEC.genes))
        np.add.at(x, np.array(row["genes"][1:]) - 3, row["expressions"][1:])
    # the pooled expression profile of each condition matches the saved expected profile
    for (line, drug, dose), total in sums.items():
        observed = total / total.sum()
        expected = profile[line, drug, dose]
        assert np.corrcoef(np.log1p(observed * 1e4), np.log1p(expected * 1e4))[0, 1] > 0.9
    # and the treated-vs-control fold change follows the saved effect at the highest dose
    line, drug, dose = 0, 1, len(doses) - 1
    observed_lfc = np.log(
        (sums[(line, drug, dose)] / sums[(line, drug, dose)].sum() + 1e-4)
        / (sums[(line, 0, 0)] / sums[(line, 0, 0)].sum() + 1e-4)
    )
    moved = np.abs(effect[line, drug, dose]) > 0.5
    assert np.corrcoef(observed_lfc[moved], effect[line, drug, dose][moved])[0, 1] > 0.7


def test_a_finished_demo_dataset_is_not_written_again(tmp_path):
    small = DemoSpec(cells=300, genes=100, shards=2, seed=2)
    assert make_demo_data_once(tmp_path, small)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert not make_demo_data_once(tmp_path, small)  # complete: nothing written
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    (tmp_path / MARKER).unlink()  # as after a run killed before its end: written again
    assert make_demo_data_once(tmp_path, small)
    assert make_demo_data_once(tmp_path, DemoSpec(cells=200, genes=100, shards=2, seed=2))  # other settings
    assert pq.read_table(sorted((tmp_path / "data").glob("*.parquet"))).num_rows == 200
