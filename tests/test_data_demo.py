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


def test_drug_effects_are_a_function_of_chemistry_and_held_out_drugs_have_no_cells(tmp_path):
    from ddsc.data.chemistry import morgan_fingerprint
    from ddsc.data.demo_compounds import COMPOUNDS
    from ddsc.data.demo_data import drug_smiles, held_out, make_ground_truth

    few, many = DemoSpec(drugs=2, seed=7), DemoSpec(drugs=6, seed=7)
    truth_few, truth_many = (make_ground_truth(s, np.random.default_rng(7)) for s in (few, many))
    # the same compound gets the same programs, EC50 and sensitivities whatever else is in the library
    np.testing.assert_allclose(truth_few.drug_program[1:], truth_many.drug_program[1:3], rtol=1e-12)
    np.testing.assert_allclose(truth_few.ec50[1:], truth_many.ec50[1:3])
    assert drug_smiles(few) == ["CS(C)=O", COMPOUNDS[0][1], COMPOUNDS[1][1]]
    np.testing.assert_array_equal(truth_few.fingerprints[1], morgan_fingerprint(COMPOUNDS[0][1]))

    spec = DemoSpec(
        cells=600, genes=100, drugs=6, shards=1, programs=6, genes_per_program=20, held_out_drugs=2, held_out_dose=0.5
    )
    make_demo_data(tmp_path, spec)
    described = json.loads((tmp_path / "ground_truth" / "conditions.json").read_text())
    drugs = described["axes"]["drug"]
    assert described["held_out"] == {"drugs": [drugs[d] for d in held_out(spec)], "doses": ["0.5"]}
    assert described["smiles"][drugs[1]] == COMPOUNDS[0][1] and described["compounds"][drugs[1]] == COMPOUNDS[0][0]
    table = pq.read_table(sorted((tmp_path / "data").glob("*.parquet"))).to_pydict()
    written = set(table["drug"])
    assert written == set(drugs) - set(described["held_out"]["drugs"])
    doses = {
        ast.literal_eval(r)[0][1]
        for r in pq.read_table(tmp_path / "sample_metadata.parquet")["drugname_drugconc"].to_pylist()
    }
    assert doses == {0.0, 0.05, 5.0}
    truth = np.load(tmp_path / "ground_truth" / "effects.npz")
    assert truth["effect"].shape == (spec.cell_lines, 7, 3, 100)  # held-out drugs and dose keep their effects
    assert all(np.abs(truth["effect"][:, d, 1]).max() > 0.1 for d in held_out(spec))
