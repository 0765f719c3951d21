"""Known drug effects (the demo dataset's saved ground truth) against what conditional generation produces.

``ddsc.data.demo_data`` draws every cell from known parameters and saves, in ``ground_truth/effects.npz``,
``effect[cell line, drug, dose, gene]``: the log-rate shift a drug causes against DMSO_TF in the same cell
line (``conditions.json`` names the axes). This module asks whether the model learnt it.

Protocol (paired, so that only the labels differ). The control cells of each cell line in the evaluation
split are collated whole (quantile bins over the whole cell, as in training) and cut into random chunks of
at most the model's training length: the *panels*. Each panel is scored once with its own control labels and
once per (drug, dose) with that drug and dose; the delta of gene g is the mean over the panels holding g of
(bin under the drug - bin under DMSO_TF), and its Pearson correlation over genes with
``effect[line, drug, dose]`` is the figure, per (cell line, drug, dose) group, averaged overall and per dose.
Genes seen in fewer than ``min_obs`` panels are left out (counted). Two estimators, asked of the model
through its ``CellModel`` (:mod:`ddsc.eval.cell_models`), so both families are scored by this code:

- ``expected`` (the headline): the model's noise-free conditional mean of every panel gene. For the masked
  family the expected bin with every bin masked at t = 1 (the mean of the per-gene distribution the first
  generation step samples from: one forward pass per panel and label set, so it can afford many control
  cells); for the latent family the decoded log mean over a fixed set of flow draws. ``expected_units`` says
  which.
- ``generated``: bins actually sampled (the configured sampler) on the panels of fewer control cells. Every
  pass draws from the same seeded random stream (common random numbers): where the labels do not change the
  model's output the draws, and the delta, are exactly 0. It adds the sampling noise of single cells.

The sign agreement on strongly moved genes counts zero deltas as misses. Bins and log-rates have different
units: Pearson ignores the scale, and with per-cell quantile bins a gene's bin rises with its log-rate, so a
perfect model scores high but not 1 (bins are coarse ranks: lowly expressed genes barely move, and renormalising
a cell shifts every other gene a little).

Unseen drugs and doses. A model with a ``molecule`` condition is asked for every drug of the ground truth by
its SMILES (``conditions.json``), a ``scalar`` dose for every dose, including the drugs and the dose the demo
kept out of the data (``make_demo_data.py --held-out-drugs``); a label model only for the labels it has. The
groups are then also summarised by ``split``: ``seen`` (drug and dose in the data), ``unseen_drug``,
``unseen_dose`` and ``unseen_drug_and_dose``, and each unseen drug is compared with two baselines built from the
model's own deltas for the drugs it saw, in the same units and on the same panels: ``nearest_seen_drug`` (the
seen drug most similar by Tanimoto on Morgan fingerprints, radius 2, 2,048 bits) and ``mean_seen_drugs`` (the
mean over the seen drugs), at the same cell line and dose. A model that learnt chemistry beats both. The same
two baselines built from the seen drugs' *true* effects (``ceiling_*``: log-rate against log-rate) say how much of
an unseen drug's effect the data's seen drugs determine at all, whatever the model: on the demo, with 20 seen
drugs, copying the nearest seen drug's exact effect correlates about 0.5 with the truth.

Reference: the same statistic on the real held-out cells: mean bin of g over the real treated cells of the
group that express it minus the same over the cell line's real controls. Its value shows how far finite,
noisy real data get in these units; the model can exceed it (it pools all training cells).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ddsc.data.chemistry import morgan_fingerprint, tanimoto
from ddsc.data.collator import CellCollator
from ddsc.eval.cell_models import CellModel
from ddsc.eval.cells import EvalCells, collate_cells, fresh_collator, split_into_panels
from ddsc.eval.drug_effects import DrugEffects
from ddsc.eval.metrics import pearson
from ddsc.model.conditions import column_slices, encode_values


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


def treatment_cond(collator: CellCollator, cond: np.ndarray, drug: str, dose: str, truth: DrugEffects):
    """``cond`` with the model's drug and dose conditions set to (``drug``, ``dose``; "" = no dose condition),
    or None when the model cannot be asked for it: a label it does not have, a drug without a SMILES."""
    out = cond.copy()
    for spec, where in zip(collator.specs, column_slices(collator.specs), strict=True):
        value = {"drug": drug, "dose": dose}.get(spec.source)
        if spec.kind == "molecule":
            value = truth.smiles.get(drug)
        if value is None:
            continue
        encoded = encode_values(spec, [value], collator.labels.encode if collator.labels else None)
        if not value or (spec.kind == "label" and encoded[0, 0] == 0):
            return None
        out[:, where] = encoded
    return out


def _has_drug_condition(collator: CellCollator) -> bool:
    return any(s.kind == "molecule" or (s.kind == "label" and s.source == "drug") for s in collator.specs)


@dataclass
class _Groups:
    """Per-group scores of one estimator, and the (true effect, estimated delta) pairs behind them."""

    scores: dict[str, dict]
    true: list[np.ndarray]
    estimated: list[np.ndarray]

    @classmethod
    def empty(cls) -> _Groups:
        return cls({}, [], [])

    def add(self, key: str, truth: DrugEffects, genes, delta, counts, effect_row: np.ndarray, min_obs: int) -> None:
        self.scores[key] = _score(truth, genes, delta, counts, effect_row, min_obs)
        columns = truth.gene_columns(genes)
        keep = (counts >= min_obs) & (columns >= 0)
        self.true.append(effect_row[columns[keep]])
        self.estimated.append(delta[keep])


def ground_truth_eval(
    cell_model: CellModel,
    collator: CellCollator,
    samples: Sequence[dict],
    truth: DrugEffects,
    control: str = "DMSO_TF",
    max_control_cells: int = 16,
    sampled_control_cells: int = 4,
    min_obs: int = 3,
) -> tuple[dict, np.ndarray, np.ndarray] | None:
    """(metrics, true effects, expected deltas, both concatenated over groups); None when the model has no
    drug condition or the evaluation cells hold no control cell of a ground-truth cell line.

    ``expected`` scores the model's conditional means (``cell_model.expected``) on the panels of up to
    ``max_control_cells`` control cells per cell line; ``generated`` scores sampled cells on the panels of the
    first ``sampled_control_cells`` of them (0 skips it); ``reference`` scores the real held-out cells."""
    if not _has_drug_condition(collator):
        return None
    seed = cell_model.seed
    samples = [s for s in samples if str(s.get("cell_line_id", "")) in set(truth.cell_lines)]
    if not samples:
        return None
    whole = collate_cells(fresh_collator(collator, seed, max_length=1 << 30), samples)
    line, drug = np.asarray(whole.metadata["cell_line_id"]), np.asarray(whole.metadata.get("drug", [""] * len(whole)))
    dose = np.asarray(whole.metadata.get("dose", [""] * len(whole)))
    rng = np.random.default_rng(seed)
    chosen = {
        ln: rng.permutation(np.flatnonzero((line == ln) & (drug == control)))[:max_control_cells].tolist()
        for ln in truth.cell_lines
    }
    controls = sorted(i for rows in chosen.values() for i in rows)
    if not controls:
        return None
    panels = split_into_panels(whole.subset(controls), collator.max_length, seed)
    panel_line = np.asarray(panels.metadata["cell_line_id"])
    first = {whole.cell_ids[i] for rows in chosen.values() for i in rows[:sampled_control_cells]}
    sampled_panels = [j for j, name in enumerate(panels.cell_ids) if name.rsplit("#", 1)[0] in first]
    by_dose = any(s.source == "dose" for s in collator.specs)
    wanted = [(d, c) for d in truth.drugs if d != control for c in (truth.doses if by_dose else [""])]
    conds = {(d, c): treatment_cond(collator, panels.cond, d, c, truth) for d, c in wanted}
    treatments = [t for t in wanted if conds[t] is not None]
    skipped = len(wanted) - len(treatments)
    expected_control = cell_model.expected(panels, panels.cond)
    sampled_control = cell_model.generate(panels, sampled_panels)
    expected, sampled, real = _Groups.empty(), _Groups.empty(), _Groups.empty()
    deltas: dict[str, tuple] = {}  # key -> (genes, expected delta, counts): the baselines' inputs
    for d, c in tqdm(treatments, desc="known drug effects", unit="treatment"):
        cond = conds[(d, c)]
        mean_diff = [a - b for a, b in zip(cell_model.expected(panels, cond), expected_control, strict=True)]
        drawn = cell_model.generate(panels, sampled_panels, cond=cond[sampled_panels])
        draw_diff = [a - b for a, b in zip(drawn.bins, sampled_control.bins, strict=True)]
        for ln in truth.cell_lines:
            rows = np.flatnonzero(panel_line == ln).tolist()
            if not rows:
                continue
            effect = _true_effect(truth, ln, d, c)
            key = f"{ln}|{d}|{c}"
            deltas[key] = mean_bin_per_gene(panels, rows, mean_diff)
            expected.add(key, truth, *deltas[key], effect, min_obs)
            drawn_rows = [k for k, j in enumerate(sampled_panels) if panel_line[j] == ln]
            if drawn_rows:
                sampled.add(key, truth, *mean_bin_per_gene(sampled_control, drawn_rows, draw_diff), effect, min_obs)
            group = np.flatnonzero((line == ln) & (drug == d) & ((dose == c) if by_dose else True))
            if len(group):
                in_line = np.flatnonzero((line == ln) & (drug == control))
                real.add(key, truth, *_real_delta(whole, group, in_line), effect, min_obs)
    metrics = {
        "source": truth.source,
        "expected": {**_summarise(expected.scores), **_by_split(expected.scores, deltas, truth, min_obs)},
        "generated": _summarise(sampled.scores),
        "reference": _summarise(real.scores),
        "control_cells": len(controls),
        "panels": len(panels),
        "sampled_control_cells": len(first),
        "sampled_panels": len(sampled_panels),
        "treatments_without_label": skipped,
        "min_obs": min_obs,
        "expected_units": cell_model.expected_units,
        **cell_model.sampler(),
    }
    return metrics, _concat(expected.true), _concat(expected.estimated)


def _by_split(scores: dict[str, dict], deltas: dict[str, tuple], truth: DrugEffects, min_obs: int) -> dict:
    """Mean delta Pearson per split (seen / unseen drug / unseen dose), and for the unseen drugs the same figure
    for the two baselines: the model's delta for the nearest seen drug (Tanimoto) and its mean over seen drugs,
    and both built from the seen drugs' true effects instead (``ceiling_*``)."""
    keys = {k: k.split("|") for k in scores}
    split = {k: truth.split(d, c) for k, (_, d, c) in keys.items()}
    out: dict = {"by_split": {}, "baselines": {}}
    for name in sorted(set(split.values())):
        values = [scores[k]["delta_pearson"] for k in scores if split[k] == name]
        out["by_split"][name] = {"mean_delta_pearson": _nanmean(values), "num_groups": len(values)}
    seen = sorted({d for k, (_, d, _) in keys.items() if d not in truth.held_out_drugs})
    unseen = sorted({d for _, d, _ in keys.values() if d in truth.held_out_drugs})
    if not (seen and unseen and all(d in truth.smiles for d in seen + unseen)):
        return out
    fingerprints = {d: morgan_fingerprint(truth.smiles[d]) for d in seen + unseen}
    nearest = {
        d: seen[int(np.argmax(tanimoto(fingerprints[d], np.stack([fingerprints[s] for s in seen]))[0]))] for d in unseen
    }
    baseline: dict[str, list[float]] = {"model": []}
    drug_of_group: list[str] = []
    for key, (ln, d, c) in keys.items():
        if d not in nearest or any(f"{ln}|{s}|{c}" not in deltas for s in seen):
            continue
        genes, _, counts = deltas[key]
        effect, columns = _true_effect(truth, ln, d, c), truth.gene_columns(genes)
        seen_effects = {  # the model's deltas for the seen drugs, and their true effects
            "": {s: deltas[f"{ln}|{s}|{c}"][1] for s in seen},
            "ceiling_": {s: _true_effect(truth, ln, s, c)[columns] for s in seen},
        }
        baseline["model"].append(scores[key]["delta_pearson"])
        drug_of_group.append(d)
        for prefix, by_drug in seen_effects.items():
            guesses = {"nearest_seen_drug": by_drug[nearest[d]], "mean_seen_drugs": np.mean(list(by_drug.values()), 0)}
            for name, guess in guesses.items():
                score = _score(truth, genes, guess, counts, effect, min_obs)
                baseline.setdefault(prefix + name, []).append(score["delta_pearson"])
    out["baselines"] = {
        "unseen_drug_groups": len(baseline["model"]),
        "nearest_seen_drug_of": nearest,
        **{f"{name}_mean_delta_pearson": _nanmean(v) for name, v in baseline.items()},
        "by_unseen_drug": {
            d: {
                name: _nanmean([x for x, of in zip(v, drug_of_group, strict=True) if of == d])
                for name, v in baseline.items()
            }
            for d in unseen
        },
    }
    return out


def _true_effect(truth: DrugEffects, line: str, drug: str, dose: str) -> np.ndarray:
    """``effect[line, drug, dose]`` over the genes; for a model without a dose condition (``dose`` "") the mean
    over the doses."""
    effect = truth.effect[truth.cell_lines.index(line), truth.drugs.index(drug)]
    return effect[truth.doses.index(dose)] if dose else effect.mean(axis=0)


def _nanmean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0)
