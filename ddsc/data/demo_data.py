"""Synthetic data in the exact Tahoe-100M file layout, with known ground truth.

The README demo (and the tests) need data that (a) goes through the real Tahoe reader unchanged and (b) has
structure a conditional model can learn and be checked against. The generative model, per cell of cell line
``l`` in a well treated with drug ``d`` at dose ``c``::

    log_rate[g] = base[g] + line_effect[l, g] + effect[l, d, c, g]
    effect[l, d, c, g] = sensitivity[l, d] * c / (c + ec50[d]) * sum_p drug_program[d, p] * member[p, g]
    counts[g] ~ NegativeBinomial(mean = library * softmax(log_rate)[g], dispersion theta)

with gene programs ``member`` (random gene sets), cell-line programs, drug effects on programs that grow
with dose (a Hill curve), DMSO_TF controls (effect 0) and log-normal library sizes. ``ground_truth/``
stores every term plus the exact expected expression profile per (cell line, drug, dose), so generated
cells can later be compared with the truth.

The drug effects are sized so that a small model can learn them from a few thousand cells and the check is
not drowned in noise, while staying plausible: each drug moves ``programs_per_drug`` programs of
``genes_per_program`` genes (by default about a fifth of all genes at the top dose, like a strong compound at
5 uM; a model sees random 128-gene panels, so each panel holds a couple of dozen moved genes), by 1-2 nats
times a per-line sensitivity of 0.5-1.2 (mostly a few-fold), with EC50s of 0.05-0.5 uM so that Tahoe's
lowest dose (0.05 uM) already has a visible effect. Cells have ~6000 UMIs and UMI-like dispersion (theta 10):
at 2000 UMIs and theta 4 most expressed genes had 1-2 counts, their per-cell quantile bins were mostly ties
and noise, and knowing the drug lowered the per-token cross-entropy by only ~0.01 nats (against ~0.05 for the
cell line), too little for a demo-sized run to pick up; here it is ~0.06 nats.

Files written under ``out``::

    data/train-NNNNN-of-MMMMM.parquet   genes list<int64> / expressions list<float32> with the <cls> marker
    gene_metadata.parquet               gene_symbol, ensembl_id, token_id (token ids from 3)
    sample_metadata.parquet             sample, plate, drug, drugname_drugconc ("[('DMSO_TF', 0.0, 'uM')]")
    ground_truth/effects.npz            numeric arrays (no pickle); ground_truth/conditions.json: axis labels
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ddsc.data.tahoe import MARKER_EXPRESSION
from ddsc.data.tokens import FIRST_GENE_ID, GENE_CLS
from ddsc.done import StepInputs

CONTROL = "DMSO_TF"
DOSE_UNIT = "uM"


@dataclass(frozen=True)
class DemoSpec:
    cells: int = 4000
    genes: int = 2000
    cell_lines: int = 4
    drugs: int = 3  # besides the DMSO_TF control
    doses: tuple[float, ...] = (0.05, 0.5, 5.0)
    plates: int = 2
    control_wells_per_plate: int = 3
    programs: int = 24
    genes_per_program: int = 100
    programs_per_drug: int = 4
    drug_effect: tuple[float, float] = (1.0, 2.0)  # |effect| of a drug on a program at saturation (nats)
    sensitivity: tuple[float, float] = (0.5, 1.2)  # per (cell line, drug) multiplier of the drug effect
    ec50: tuple[float, float] = (0.05, 0.5)  # log-uniform range of the Hill curve's half-effect dose (uM)
    mean_library: float = 6000.0
    theta: float = 10.0  # NB dispersion: variance = mean + mean^2 / theta
    shards: int = 4
    row_group_size: int = 500
    seed: int = 0


@dataclass
class GroundTruth:
    base: np.ndarray  # [G] base log-rate
    member: np.ndarray  # [P, G] 0/1 gene programs
    line_effect: np.ndarray  # [L, G] log-rate shift of each cell line
    drug_program: np.ndarray  # [D, P] effect of each drug on each program (row 0 = DMSO_TF = 0)
    sensitivity: np.ndarray  # [L, D]
    ec50: np.ndarray  # [D]
    doses: np.ndarray  # [C]

    def effect(self) -> np.ndarray:
        """[L, D, C, G] log-rate effect of drug d at dose c on cell line l (0 for DMSO_TF)."""
        hill = self.doses[None, :] / (self.doses[None, :] + self.ec50[:, None])  # [D, C]
        program_effect = self.drug_program @ self.member  # [D, G]
        return self.sensitivity[:, :, None, None] * hill[None, :, :, None] * program_effect[None, :, None, :]

    def expected_profile(self) -> np.ndarray:
        """[L, D, C, G] expected fraction of a cell's counts on each gene (the NB mean / library size)."""
        log_rate = self.base + self.line_effect[:, None, None, :] + self.effect()
        log_rate -= log_rate.max(axis=-1, keepdims=True)
        rate = np.exp(log_rate)
        return rate / rate.sum(axis=-1, keepdims=True)


def make_ground_truth(spec: DemoSpec, rng: np.random.Generator) -> GroundTruth:
    n_drugs = spec.drugs + 1
    member = np.zeros((spec.programs, spec.genes))
    for p in range(spec.programs):
        member[p, rng.choice(spec.genes, spec.genes_per_program, replace=False)] = 1.0
    line_program = rng.normal(0.0, 1.0, (spec.cell_lines, spec.programs)) * (
        rng.random((spec.cell_lines, spec.programs)) < 0.3
    )
    drug_program = np.zeros((n_drugs, spec.programs))
    for d in range(1, n_drugs):  # each drug moves a few programs, up or down
        k = spec.programs_per_drug
        targets = rng.choice(spec.programs, k, replace=False)
        drug_program[d, targets] = rng.choice([-1.0, 1.0], k) * rng.uniform(*spec.drug_effect, k)
    sensitivity = rng.uniform(*spec.sensitivity, (spec.cell_lines, n_drugs))
    sensitivity[:, 0] = 0.0
    return GroundTruth(
        base=rng.normal(0.0, 1.5, spec.genes),
        member=member,
        line_effect=line_program @ member,
        drug_program=drug_program,
        sensitivity=sensitivity,
        ec50=np.exp(rng.uniform(*np.log(spec.ec50), n_drugs)),
        doses=np.asarray(spec.doses, dtype=np.float64),
    )


def draw_counts(spec: DemoSpec, profile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Counts [n, G] of cells with expected profiles ``profile`` [n, G]: log-normal library sizes and
    negative-binomial noise (a gamma-Poisson mixture) around ``library * profile``."""
    library = rng.lognormal(np.log(spec.mean_library), 0.4, len(profile))
    mean = library[:, None] * profile
    return rng.poisson(rng.gamma(spec.theta, mean / spec.theta))


def write_tahoe_shard(
    path: str | Path,
    offsets: np.ndarray,
    genes: np.ndarray,
    expressions: np.ndarray,
    columns: dict[str, list[str]],
    row_group_size: int = 1000,
) -> None:
    """Write one Tahoe-layout shard from ragged arrays (markers included by the caller) and string columns."""
    pq.write_table(tahoe_table(offsets, genes, expressions, columns), path, row_group_size=row_group_size)


def tahoe_table(
    offsets: np.ndarray, genes: np.ndarray, expressions: np.ndarray, columns: dict[str, list[str]]
) -> pa.Table:
    """Ragged arrays (markers included) + string columns -> a table with Tahoe-100M's column types."""
    offsets = pa.array(np.asarray(offsets, dtype=np.int32))
    return pa.table(
        {
            "genes": pa.ListArray.from_arrays(offsets, pa.array(np.asarray(genes, dtype=np.int64))),
            "expressions": pa.ListArray.from_arrays(offsets, pa.array(np.asarray(expressions, dtype=np.float32))),
            **{name: pa.array(values, type=pa.string()) for name, values in columns.items()},
        }
    )


def _with_markers(counts: np.ndarray, token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense [cells, genes] counts -> ragged (offsets, genes, expressions) of non-zero genes after the marker."""
    rows, cols = np.nonzero(counts)
    per_cell = np.bincount(rows, minlength=len(counts)) + 1
    offsets = np.concatenate([[0], np.cumsum(per_cell)])
    genes = np.empty(offsets[-1], dtype=np.int64)
    values = np.empty(offsets[-1], dtype=np.float32)
    genes[offsets[:-1]], values[offsets[:-1]] = GENE_CLS, MARKER_EXPRESSION
    body = np.ones(offsets[-1], dtype=bool)
    body[offsets[:-1]] = False
    genes[body], values[body] = token_ids[cols], counts[rows, cols]
    return offsets, genes, values


def _samples(spec: DemoSpec, drug_names: list[str]) -> list[dict]:
    """Wells: per plate, every (drug, dose) once and a few DMSO_TF controls (dose index -1)."""
    wells = []
    for plate in range(1, spec.plates + 1):
        conditions = [(0, -1)] * spec.control_wells_per_plate
        conditions += [(d, c) for d in range(1, len(drug_names)) for c in range(len(spec.doses))]
        for d, c in conditions:
            dose = 0.0 if c < 0 else spec.doses[c]
            wells.append(
                {
                    "sample": f"smp_{len(wells) + 1:04d}",
                    "plate": f"plate{plate}",
                    "drug_index": d,
                    "dose_index": c,
                    "drug": drug_names[d],
                    "dose": dose,
                }
            )
    return wells


def make_demo_data(out: str | Path, spec: DemoSpec = DemoSpec()) -> dict:
    """Write the demo dataset under ``out``; returns a small description (also saved as ground truth)."""
    out = Path(out)
    rng = np.random.default_rng(spec.seed)
    truth = make_ground_truth(spec, rng)
    token_ids = np.arange(FIRST_GENE_ID, FIRST_GENE_ID + spec.genes, dtype=np.int64)
    lines = [f"CVCL_DM{i:02d}" for i in range(spec.cell_lines)]
    drugs = [CONTROL] + [f"demodrug_{chr(ord('a') + i)}" for i in range(spec.drugs)]
    wells = _samples(spec, drugs)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "ground_truth").mkdir(exist_ok=True)

    pq.write_table(
        pa.table(
            {
                "gene_symbol": [f"DEMO{i:05d}" for i in range(spec.genes)],
                "ensembl_id": [f"ENSG9{i:010d}" for i in range(spec.genes)],
                "token_id": token_ids,
            }
        ),
        out / "gene_metadata.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "sample": [w["sample"] for w in wells],
                "plate": [w["plate"] for w in wells],
                "drug": [w["drug"] for w in wells],
                "drugname_drugconc": [f"[('{w['drug']}', {w['dose']!r}, '{DOSE_UNIT}')]" for w in wells],
            }
        ),
        out / "sample_metadata.parquet",
    )

    profile = truth.expected_profile()  # [L, D, C, G]
    moa = {d: ("vehicle" if d == CONTROL else f"demo mechanism {i}") for i, d in enumerate(drugs)}
    smiles = {d: ("CS(C)=O" if d == CONTROL else "C" * (i + 2) + "O") for i, d in enumerate(drugs)}
    cid = {d: ("679.0" if d == CONTROL else f"{9000000 + i}.0") for i, d in enumerate(drugs)}
    bounds = np.linspace(0, spec.cells, spec.shards + 1).astype(int)
    for shard in tqdm(range(spec.shards), desc="demo shards"):
        n = bounds[shard + 1] - bounds[shard]
        well = rng.integers(len(wells), size=n)
        line = rng.integers(spec.cell_lines, size=n)
        d = np.array([wells[w]["drug_index"] for w in well])
        c = np.array([max(wells[w]["dose_index"], 0) for w in well])  # DMSO: effect is 0 at every dose index
        counts = draw_counts(spec, profile[line, d, c], rng)
        offsets, genes, values = _with_markers(counts, token_ids)
        cells = np.arange(bounds[shard], bounds[shard + 1])
        columns = {
            "drug": [wells[w]["drug"] for w in well],
            "sample": [wells[w]["sample"] for w in well],
            "BARCODE_SUB_LIB_ID": [f"{i:08d}_demo-lib_{shard + 1}" for i in cells],
            "cell_line_id": [lines[i] for i in line],
            "moa-fine": [moa[wells[w]["drug"]] for w in well],
            "canonical_smiles": [smiles[wells[w]["drug"]] for w in well],
            "pubchem_cid": [cid[wells[w]["drug"]] for w in well],
            "plate": [wells[w]["plate"] for w in well],
        }
        name = f"train-{shard:05d}-of-{spec.shards:05d}.parquet"
        write_tahoe_shard(out / "data" / name, offsets, genes, values, columns, spec.row_group_size)

    np.savez_compressed(
        out / "ground_truth" / "effects.npz",
        effect=truth.effect().astype(np.float32),
        expected_profile=profile.astype(np.float32),
        base=truth.base,
        member=truth.member,
        line_effect=truth.line_effect,
        drug_program=truth.drug_program,
        sensitivity=truth.sensitivity,
        ec50=truth.ec50,
        doses=truth.doses,
        gene_token_ids=token_ids,
    )
    conditions = {
        "axes": {
            "cell_line_id": lines,
            "drug": drugs,
            "dose": [format(x, "g") for x in spec.doses],
            "gene_token_ids": "effects.npz:gene_token_ids",
        },
        "arrays": {
            "effect": "[cell_line, drug, dose, gene] log-rate effect vs DMSO_TF of the same line",
            "expected_profile": "[cell_line, drug, dose, gene] expected fraction of a cell's counts; "
            "DMSO_TF (drug 0) is the same at every dose index",
        },
        "model": __doc__.split("::", 1)[1].split("with gene programs", 1)[0].strip(),
        "dose_unit": DOSE_UNIT,
        "spec": asdict(spec),
    }
    (out / "ground_truth" / "conditions.json").write_text(json.dumps(conditions, indent=1))
    return conditions


def make_demo_data_once(out: str | Path, spec: DemoSpec = DemoSpec()) -> bool:
    """``make_demo_data`` unless ``out`` already holds this spec's complete dataset; True when it wrote it.

    A done marker (``ddsc.done``) is written last, so a run killed halfway is redone, and a finished one is
    not rewritten (which would touch every file and make later steps think their inputs changed)."""
    inputs = StepInputs.of([], {"demo_spec": asdict(spec)})
    if inputs.done_in(out):
        return False
    inputs.begin(out)
    make_demo_data(out, spec)
    inputs.mark_done(out)
    return True


def synthetic_shard(
    path: str | Path,
    cells: int,
    genes_per_cell: int = 2000,
    n_genes: int = 20000,
    seed: int = 0,
    row_group_size: int = 1000,
) -> None:
    """A Tahoe-layout shard of realistic size for throughput benchmarks: no biology, just the right shape
    (about ``genes_per_cell`` non-zero genes of ``n_genes``, small integer counts), written in row groups."""
    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, cells, row_group_size):
        n = min(row_group_size, cells - start)
        present = rng.random((n, n_genes), dtype=np.float32) < genes_per_cell / n_genes
        counts = np.where(present, rng.geometric(0.5, (n, n_genes)), 0)
        offsets, genes, values = _with_markers(counts, np.arange(FIRST_GENE_ID, FIRST_GENE_ID + n_genes))
        columns = {
            name: [f"{name}_{i % 7}" for i in range(start, start + n)]
            for name in ("drug", "sample", "cell_line_id", "moa-fine", "canonical_smiles", "pubchem_cid", "plate")
        }
        columns["BARCODE_SUB_LIB_ID"] = [f"bc{i}" for i in range(start, start + n)]
        table = tahoe_table(offsets, genes, values, columns)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
