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

Chemistry. Each demo drug is a real compound (``COMPOUNDS``: public structures of well-known drugs, written as
``canonical_smiles``), and its effect is a fixed function of its Morgan fingerprint (``ddsc.data.chemistry``),
so a model conditioned on molecules can learn it and predict drugs it never saw: random projections of the
fingerprint bits pick the programs a drug moves, their signs and sizes (``drug_program``), its EC50 and each
cell line's sensitivity to it. Only bits set in at least ``SHARED_BIT_COMPOUNDS`` compounds of the library
carry weight (substructures shared by a family: profens, quinazolines, xanthines, steroids, ...), so what
drives a drug's effect is also seen in other drugs. ``held_out_drugs`` / ``held_out_dose`` keep drugs and a
dose level out of the written cells (their true effects stay in the ground truth), for the unseen-drug and
unseen-dose evaluation.

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

from ddsc.data.chemistry import morgan_fingerprint
from ddsc.data.demo_compounds import COMPOUNDS
from ddsc.data.tahoe_writer import with_markers, write_tahoe_shard
from ddsc.data.tokens import FIRST_GENE_ID
from ddsc.done import StepInputs

CONTROL = "DMSO_TF"
CONTROL_SMILES = "CS(C)=O"
DOSE_UNIT = "uM"
SHARED_BIT_COMPOUNDS = 3


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
    held_out_drugs: int = 0  # drugs (chosen with the seed) whose cells are not written
    held_out_dose: float = 0.0  # a dose (one of ``doses``) whose cells are not written; 0 = none

    def __post_init__(self) -> None:
        if not 0 < self.drugs <= len(COMPOUNDS):
            raise ValueError(f"drugs: the demo has {len(COMPOUNDS)} compounds, got drugs={self.drugs}")
        if not 0 <= self.held_out_drugs < self.drugs:
            raise ValueError(f"held_out_drugs: must be in [0, drugs={self.drugs}), got {self.held_out_drugs}")
        if self.held_out_dose and self.held_out_dose not in self.doses:
            raise ValueError(f"held_out_dose: {self.held_out_dose} is not one of the doses {self.doses}")


@dataclass
class GroundTruth:
    base: np.ndarray  # [G] base log-rate
    member: np.ndarray  # [P, G] 0/1 gene programs
    line_effect: np.ndarray  # [L, G] log-rate shift of each cell line
    drug_program: np.ndarray  # [D, P] effect of each drug on each program (row 0 = DMSO_TF = 0)
    sensitivity: np.ndarray  # [L, D]
    ec50: np.ndarray  # [D]
    doses: np.ndarray  # [C]
    fingerprints: np.ndarray  # [D, bits] Morgan fingerprints of the drugs' SMILES (row 0 = DMSO_TF)

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


def drug_smiles(spec: DemoSpec) -> list[str]:
    """SMILES of DMSO_TF and the spec's drugs, in drug order."""
    return [CONTROL_SMILES] + [smiles for _, smiles in COMPOUNDS[: spec.drugs]]


def make_ground_truth(spec: DemoSpec, rng: np.random.Generator) -> GroundTruth:
    n_drugs = spec.drugs + 1
    member = np.zeros((spec.programs, spec.genes))
    for p in range(spec.programs):
        member[p, rng.choice(spec.genes, spec.genes_per_program, replace=False)] = 1.0
    line_program = rng.normal(0.0, 1.0, (spec.cell_lines, spec.programs)) * (
        rng.random((spec.cell_lines, spec.programs)) < 0.3
    )
    fingerprints = np.stack([morgan_fingerprint(s) for s in drug_smiles(spec)]).astype(np.float64)
    library = np.stack([morgan_fingerprint(s) for _, s in COMPOUNDS])
    shared = library.sum(axis=0) >= SHARED_BIT_COMPOUNDS  # the same bits whatever the spec's number of drugs
    # shared bits, scaled to unit norm and centred on the library's mean (bits most compounds have, such as an
    # aromatic carbon, would otherwise push every drug towards the same programs)
    features, centre = (
        x * shared / np.sqrt(np.maximum((x * shared).sum(1, keepdims=True), 1)) for x in (fingerprints, library)
    )
    features = features - centre.mean(axis=0)
    projection = rng.normal(0.0, 1.0, (len(shared), spec.programs + 1 + spec.cell_lines))
    score = features @ projection  # [D, programs + ec50 + cell lines], about N(0, 1) per drug
    program_score = score[:, : spec.programs]
    drug_program = np.zeros((n_drugs, spec.programs))
    low, high = spec.drug_effect
    for d in range(1, n_drugs):  # each drug moves its programs_per_drug highest-scoring programs, up or down
        targets = np.argsort(-np.abs(program_score[d]), kind="stable")[: spec.programs_per_drug]
        size = low + (high - low) * np.tanh(np.abs(program_score[d, targets]) / 2)
        drug_program[d, targets] = np.sign(program_score[d, targets]) * size
    unit = 1 / (1 + np.exp(-score[:, spec.programs :]))  # [D, 1 + cell lines] in (0, 1): the EC50, then each line
    log_ec50 = np.log(spec.ec50[0]) + np.log(spec.ec50[1] / spec.ec50[0]) * unit[:, 0]
    sensitivity = spec.sensitivity[0] + (spec.sensitivity[1] - spec.sensitivity[0]) * unit[:, 1:].T
    sensitivity[:, 0] = 0.0
    return GroundTruth(
        base=rng.normal(0.0, 1.5, spec.genes),
        member=member,
        line_effect=line_program @ member,
        drug_program=drug_program,
        sensitivity=sensitivity,
        ec50=np.exp(log_ec50),
        doses=np.asarray(spec.doses, dtype=np.float64),
        fingerprints=fingerprints,
    )


def held_out(spec: DemoSpec) -> list[int]:
    """Drug indices (1..drugs) whose cells the demo does not write: a fixed choice per seed."""
    rng = np.random.default_rng([spec.seed, 1])
    return sorted(int(d) for d in rng.choice(np.arange(1, spec.drugs + 1), spec.held_out_drugs, replace=False))


def draw_counts(spec: DemoSpec, profile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Counts [n, G] of cells with expected profiles ``profile`` [n, G]: log-normal library sizes and
    negative-binomial noise (a gamma-Poisson mixture) around ``library * profile``."""
    library = rng.lognormal(np.log(spec.mean_library), 0.4, len(profile))
    mean = library[:, None] * profile
    return rng.poisson(rng.gamma(spec.theta, mean / spec.theta))


def _samples(spec: DemoSpec, drug_names: list[str]) -> list[dict]:
    """Wells: per plate, every (drug, dose) once and a few DMSO_TF controls (dose index -1); none for the
    held-out drugs and dose."""
    skip = set(held_out(spec))
    doses = [c for c, x in enumerate(spec.doses) if x != spec.held_out_dose]
    wells = []
    for plate in range(1, spec.plates + 1):
        conditions = [(0, -1)] * spec.control_wells_per_plate
        conditions += [(d, c) for d in range(1, len(drug_names)) if d not in skip for c in doses]
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
    smiles = dict(zip(drugs, drug_smiles(spec), strict=True))
    cid = {d: ("679.0" if d == CONTROL else f"{9000000 + i}.0") for i, d in enumerate(drugs)}
    bounds = np.linspace(0, spec.cells, spec.shards + 1).astype(int)
    for shard in tqdm(range(spec.shards), desc="demo shards"):
        n = bounds[shard + 1] - bounds[shard]
        well = rng.integers(len(wells), size=n)
        line = rng.integers(spec.cell_lines, size=n)
        d = np.array([wells[w]["drug_index"] for w in well])
        c = np.array([max(wells[w]["dose_index"], 0) for w in well])  # DMSO: effect is 0 at every dose index
        counts = draw_counts(spec, profile[line, d, c], rng)
        offsets, genes, values = with_markers(counts, token_ids)
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
        fingerprints=truth.fingerprints.astype(np.uint8),
        gene_token_ids=token_ids,
    )
    conditions = {
        "axes": {
            "cell_line_id": lines,
            "drug": drugs,
            "dose": [format(x, "g") for x in spec.doses],
            "gene_token_ids": "effects.npz:gene_token_ids",
        },
        "smiles": smiles,
        "compounds": {d: name for d, (name, _) in zip(drugs[1:], COMPOUNDS, strict=False)},
        "held_out": {
            "drugs": [drugs[d] for d in held_out(spec)],
            "doses": [format(spec.held_out_dose, "g")] if spec.held_out_dose else [],
        },
        "arrays": {
            "effect": "[cell_line, drug, dose, gene] log-rate effect vs DMSO_TF of the same line",
            "expected_profile": "[cell_line, drug, dose, gene] expected fraction of a cell's counts; "
            "DMSO_TF (drug 0) is the same at every dose index",
            "fingerprints": "[drug, bit] Morgan fingerprint (radius 2, 2048 bits) of the drug's SMILES",
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
