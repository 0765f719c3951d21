"""Known drug effects (the demo dataset's saved ground truth) against what conditional generation produces.

``ddsc.data.demo_data`` draws every cell from known parameters and saves, in ``ground_truth/effects.npz``,
``effect[cell line, drug, dose, gene]``: the log-rate shift a drug causes against DMSO_TF in the same cell
line (``conditions.json`` names the axes). This module asks whether the model learnt it.

Protocol (paired, so that only the labels differ). The control cells of each cell line in the evaluation
split are collated whole (quantile bins over the whole cell, as in training) and cut into random chunks of
at most the model's training length: the *panels*. Every panel is generated from scratch once with its own
control labels and once per (drug, dose) with that drug and dose. The generated delta of gene g is the mean
over the panels holding g of (bin under the drug - bin under DMSO_TF); its Pearson correlation over genes
with ``effect[line, drug, dose]`` is the figure, per (cell line, drug, dose). Genes seen in fewer than
``min_obs`` panels are left out (counted). Every pass draws from the same seeded random stream (common random
numbers): where the labels do not change the model's output the draws, and the delta, are exactly 0, so the
noise of sampling does not pose as a drug effect. The sign agreement counts such zeros as misses. Bins and log-rates have different units: Pearson ignores the
scale, and with per-cell quantile bins a gene's bin rises with its log-rate, so a perfect model scores high
but, because bins are coarse ranks, not exactly 1.

Reference: the same statistic on the real held-out cells: mean bin of g over the real treated cells of the
group that express it minus the same over the cell line's real controls. Its value shows how far finite,
noisy real data get in these units; the generated figure can exceed it (the model pools all training cells).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddsc.data.collator import CellCollator
from ddsc.data.tokens import ExpressionTokens
from ddsc.eval.cells import EvalCells, collate_cells, fresh_collator
from ddsc.eval.generation import generate_bins
from ddsc.eval.metrics import pearson
from ddsc.eval.settings import SamplerSettings

EFFECTS_FILE = "effects.npz"
AXES_FILE = "conditions.json"


@dataclass
class DrugEffects:
    """``effect[line, drug, dose, gene]`` with its axis labels (drug 0 = the control)."""

    effect: np.ndarray  # float [L, D, C, G]
    cell_lines: list[str]
    drugs: list[str]
    doses: list[str]
    gene_ids: np.ndarray  # int64 [G] token ids
    source: str

    @classmethod
    def load(cls, path: str | Path) -> DrugEffects:
        """From a ``ground_truth`` folder (``effects.npz`` + ``conditions.json``, as the demo writes them)."""
        folder = Path(path)
        for name in (EFFECTS_FILE, AXES_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder}: not a ground-truth folder (no {name}; see ddsc/data/demo_data.py)")
        with np.load(folder / EFFECTS_FILE, allow_pickle=False) as arrays:
            effect, gene_ids = arrays["effect"].astype(np.float64), arrays["gene_token_ids"].astype(np.int64)
        axes = json.loads((folder / AXES_FILE).read_text())["axes"]
        truth = cls(effect, list(axes["cell_line_id"]), list(axes["drug"]), list(axes["dose"]), gene_ids, str(folder))
        expected = (len(truth.cell_lines), len(truth.drugs), len(truth.doses), len(gene_ids))
        if effect.shape != expected:
            raise ValueError(f"{folder / EFFECTS_FILE}: effect has shape {effect.shape}, axes say {expected}")
        return truth

    def gene_columns(self, gene_ids: np.ndarray) -> np.ndarray:
        """Column of each token id in ``effect`` (-1 for genes the ground truth does not cover)."""
        lookup = np.full(max(int(self.gene_ids.max()), int(np.max(gene_ids, initial=0))) + 1, -1)
        lookup[self.gene_ids] = np.arange(len(self.gene_ids))
        return lookup[gene_ids]


def find_ground_truth(data: Path) -> Path | None:
    """The demo's ground truth for MDS folder ``data``: ``data/ground_truth`` or, in the demo layout
    (``DIR/tahoe`` converted to ``DIR/mds``), ``data/../tahoe/ground_truth``; used only when its cell lines and
    drugs are all labels of the dataset (a stale folder from another demo must not be picked up)."""
    labels_file = data / "labels.json"
    if not labels_file.is_file():
        return None
    labels = json.loads(labels_file.read_text())
    for folder in (data / "ground_truth", data.parent / "tahoe" / "ground_truth"):
        if (folder / EFFECTS_FILE).is_file() and (folder / AXES_FILE).is_file():
            axes = json.loads((folder / AXES_FILE).read_text())["axes"]
            if all(set(axes[c]) <= set(labels.get(c, [])) for c in ("cell_line_id", "drug")):
                return folder
    return None


def split_into_panels(cells: EvalCells, max_length: int, seed: int) -> EvalCells:
    """Every cell cut into random chunks of at most ``max_length`` genes (bins kept: they are per whole cell)."""
    rng = np.random.default_rng(seed)
    ids, genes, bins, rows = [], [], [], []
    for i in range(len(cells)):
        n = len(cells.genes[i])
        for k, part in enumerate(np.array_split(rng.permutation(n), max(1, math.ceil(n / max_length)))):
            part = np.sort(part)
            ids.append(f"{cells.cell_ids[i]}#{k}")
            genes.append(cells.genes[i][part])
            bins.append(cells.bins[i][part])
            rows.append(i)
    metadata = {c: [v[i] for i in rows] for c, v in cells.metadata.items()}
    return EvalCells(ids, genes, bins, cells.cond[rows], metadata)


def mean_bin_per_gene(cells: EvalCells, idx: Sequence[int], values: list[np.ndarray] | None = None):
    """(gene ids, mean of ``values`` (default: the bins) over cells ``idx`` that hold the gene, cell count)."""
    values = cells.bins if values is None else values
    if not len(idx):
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
    genes = np.concatenate([cells.genes[i] for i in idx])
    vals = np.concatenate([values[i] for i in idx]).astype(np.float64)
    ids, inverse, counts = np.unique(genes, return_inverse=True, return_counts=True)
    return ids, np.bincount(inverse, weights=vals) / counts, counts


def _score(truth: DrugEffects, genes, delta, counts, effect_row: np.ndarray, min_obs: int) -> dict:
    """Pearson of ``delta`` with the true effect over genes with >= ``min_obs`` observations, and the sign
    agreement on the genes the drug moves by more than 0.5 nats (the ones a user would call hits)."""
    columns = truth.gene_columns(genes)
    keep = (counts >= min_obs) & (columns >= 0)
    true, pred = effect_row[columns[keep]], delta[keep]
    strong = np.abs(true) > 0.5
    return {
        "delta_pearson": pearson(true, pred) if keep.sum() > 2 else float("nan"),
        "sign_agreement_strong": float(np.mean(np.sign(pred[strong]) == np.sign(true[strong])))
        if strong.any()
        else float("nan"),
        "num_genes": int(keep.sum()),
        "num_strong_genes": int(strong.sum()),
        "genes_below_min_obs": int(((counts < min_obs) & (columns >= 0)).sum()),
    }


def _summarise(groups: dict[str, dict]) -> dict:
    """Means over groups, overall and per dose (the effect grows with dose, so the figure should too)."""

    def mean(values):
        values = [v for v in values if not math.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    doses = sorted({key.split("|")[2] for key in groups}, key=lambda d: float(d) if d else 0.0)
    return {
        "num_groups": len(groups),
        "mean_delta_pearson": mean([g["delta_pearson"] for g in groups.values()]),
        "mean_sign_agreement_strong": mean([g["sign_agreement_strong"] for g in groups.values()]),
        "by_dose": {d: mean([g["delta_pearson"] for k, g in groups.items() if k.split("|")[2] == d]) for d in doses},
        "groups": groups,
    }


def _real_delta(cells: EvalCells, treated: Sequence[int], controls: Sequence[int]):
    """(genes, mean bin in treated cells holding the gene - same in controls, min of the two cell counts)."""
    genes_t, mean_t, count_t = mean_bin_per_gene(cells, treated)
    genes_c, mean_c, count_c = mean_bin_per_gene(cells, controls)
    genes, it, ic = np.intersect1d(genes_t, genes_c, assume_unique=True, return_indices=True)
    return genes, mean_t[it] - mean_c[ic], np.minimum(count_t[it], count_c[ic])


def _treatments(truth: DrugEffects, labels, control: str, by_dose: bool) -> tuple[list[tuple[str, str]], int]:
    """(drug, dose) pairs of the ground truth that the model has labels for ("" dose: model without dose),
    and how many were skipped for an unknown label."""
    wanted = [(d, c) for d in truth.drugs if d != control for c in (truth.doses if by_dose else [""])]
    known = [
        (d, c) for d, c in wanted if labels.encode("drug", [d])[0] > 0 and (not c or labels.encode("dose", [c])[0] > 0)
    ]
    return known, len(wanted) - len(known)


def ground_truth_eval(
    model: Callable,
    collator: CellCollator,
    samples: Sequence[dict],
    truth: DrugEffects,
    settings: SamplerSettings,
    control: str = "DMSO_TF",
    max_control_cells: int = 32,
    min_obs: int = 3,
    device="cpu",
    diffusion_cfg=None,
) -> tuple[dict, np.ndarray, np.ndarray] | None:
    """(metrics, true effects, generated deltas, both concatenated over groups); None when the model has no
    drug condition or the evaluation cells hold no control cell of a ground-truth cell line."""
    conditions = list(collator.conditions)
    if "drug" not in conditions or collator.labels is None:
        return None
    labels, tokens = collator.labels, ExpressionTokens(collator.binning.num_bins)
    samples = [s for s in samples if str(s.get("cell_line_id", "")) in set(truth.cell_lines)]
    if not samples:
        return None
    whole = collate_cells(fresh_collator(collator, settings.seed, max_length=1 << 30), samples)
    line, drug = np.asarray(whole.metadata["cell_line_id"]), np.asarray(whole.metadata.get("drug", [""] * len(whole)))
    dose = np.asarray(whole.metadata.get("dose", [""] * len(whole)))
    rng = np.random.default_rng(settings.seed)
    controls = sorted(
        i
        for ln in truth.cell_lines
        for i in rng.permutation(np.flatnonzero((line == ln) & (drug == control)))[:max_control_cells].tolist()
    )
    if not controls:
        return None
    panels = split_into_panels(whole.subset(controls), collator.max_length, settings.seed)
    panel_line = np.asarray(panels.metadata["cell_line_id"])
    by_dose = "dose" in conditions
    treatments, skipped = _treatments(truth, labels, control, by_dose)
    every = list(range(len(panels)))
    common = dict(device=device, diffusion_cfg=diffusion_cfg)
    generated_control = generate_bins(model, panels, every, tokens, settings, **common)
    generated, real, true_parts, gen_parts = {}, {}, [], []
    for d, c in treatments:
        cond = panels.cond.copy()
        cond[:, conditions.index("drug")] = labels.encode("drug", [d])[0]
        if by_dose:
            cond[:, conditions.index("dose")] = labels.encode("dose", [c])[0]
        treated = generate_bins(model, panels, every, tokens, settings, cond=cond, **common)
        diff = [t - b for t, b in zip(treated.bins, generated_control.bins, strict=True)]
        for li, ln in enumerate(truth.cell_lines):
            rows = np.flatnonzero(panel_line == ln).tolist()
            if not rows:
                continue
            effect = truth.effect[li, truth.drugs.index(d)]
            effect = effect[truth.doses.index(c)] if by_dose else effect.mean(axis=0)
            key = f"{ln}|{d}|{c}"
            genes, delta, counts = mean_bin_per_gene(panels, rows, diff)
            generated[key] = _score(truth, genes, delta, counts, effect, min_obs)
            keep = (counts >= min_obs) & (truth.gene_columns(genes) >= 0)
            true_parts.append(effect[truth.gene_columns(genes[keep])])
            gen_parts.append(delta[keep])
            group = np.flatnonzero((line == ln) & (drug == d) & ((dose == c) if by_dose else True))
            if len(group):
                in_line = np.flatnonzero((line == ln) & (drug == control))
                real[key] = _score(truth, *_real_delta(whole, group, in_line), effect, min_obs)
    metrics = {
        "source": truth.source,
        "generated": _summarise(generated),
        "reference": _summarise(real),
        "control_cells": len(controls),
        "panels": len(panels),
        "treatments_without_label": skipped,
        "min_obs": min_obs,
        "sampler": settings.method,
        "steps": settings.steps,
    }
    return metrics, _concat(true_parts), _concat(gen_parts)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0)
