"""Generation and perturbation evaluation, each next to its real-vs-held-out-real reference value.

The held-out evaluation cells are split in two halves by a seeded permutation: A (the "real" set every
metric compares against) and B. Generated cells take B's gene panels and labels with every bin generated
from scratch, so generated-vs-A and the reference B-vs-A differ only in where the bins came from: a perfect
generator scores like the reference, not like 0.

Distances are measured in a PCA fitted on a *separate* fit set (the baseline train cells), so A, B and the
generated cells are all out of sample. A PCA fitted on A itself captures A's own noise and makes A look
wider than any other sample, held-out real cells included: with a few hundred cells the per-PC variance of
held-out real cells on A's first 10 PCs is a fraction of A's, and the figure then suggests a mode collapse
the metrics do not show. ``pc_variance_ratio`` (mean over the first 10 PCs of a sample's variance over A's)
makes that check a number: about 1 for the held-out real cells, below 1 for a generator that collapses.

Perturbation (data with drug labels) is scored in the field's terms by :mod:`ddsc.eval.perturbation`, on
whole cells; the model's cells are counterfactual: each treated cell of B is generated on the gene panel of a
random control cell of its cell line, with the treated cell's labels, and B's control cells are regenerated
with their own, so the model's effect comes from the condition alone. With nonzero-only binning the part of a real effect
that switches genes on or off cannot be generated on a fixed panel, which caps the model below the real
split-half ceiling.

Cells are compared as dense vectors over the ``max_genes`` genes most often present in the evaluation
cells: value ``bin + 1`` where the gene is in the cell and 0 where it is not, or, when the binning reserves
bin 0 for unexpressed genes (``zero_fraction > 0``), the bin itself with absent genes as 0.
"""

from __future__ import annotations

import numpy as np

from ddsc.eval.bootstrap import mean_interval, resample_weights
from ddsc.eval.cell_models import CellModel
from ddsc.eval.cells import EvalCells, split_into_panels
from ddsc.eval.metrics import PCA, generation_metrics
from ddsc.eval.perturbation import METRICS, LineCells, score_line


def generate_whole(
    cell_model: CellModel, cells: EvalCells, idx: list[int], panels: list[int], max_length: int
) -> EvalCells:
    """``cell_model.generate`` for whole cells longer than the model's ``max_length``: the genes of cell
    ``panels[j]`` are cut into random chunks of at most ``max_length`` (as in training, where a long cell is a
    random subset), every chunk is generated with cell ``idx[j]``'s labels, and the chunks are put together."""
    source = EvalCells(
        [str(j) for j in range(len(panels))],
        [cells.genes[p] for p in panels],
        [cells.bins[p] for p in panels],
        cells.cond[idx],
        {},
    )
    chunks = split_into_panels(source, max_length, cell_model.seed)
    drawn = cell_model.generate(chunks, list(range(len(chunks))))
    owner = np.array([int(name.rsplit("#", 1)[0]) for name in chunks.cell_ids])
    parts = [np.flatnonzero(owner == j) for j in range(len(panels))]
    metadata = {c: [v[i] for i in idx] for c, v in cells.metadata.items()}
    return EvalCells(
        [cells.cell_ids[i] for i in idx],
        [np.concatenate([drawn.genes[k] for k in part]) for part in parts],
        [np.concatenate([drawn.bins[k] for k in part]) for part in parts],
        cells.cond[idx],
        metadata,
    )


def top_genes(cells: EvalCells, max_genes: int) -> np.ndarray:
    """The ``max_genes`` gene ids present in the most cells (ties: lower id first)."""
    ids, freq = np.unique(np.concatenate(cells.genes), return_counts=True)
    return ids[np.lexsort((ids, -freq))[:max_genes]]


def dense(cells: EvalCells, idx: list[int] | range, columns: np.ndarray, zero_bin: bool) -> np.ndarray:
    """Cells ``idx`` as float rows over ``columns`` (see the module docstring for the encoding)."""
    lookup = {int(g): c for c, g in enumerate(columns)}
    out = np.zeros((len(idx), len(columns)))
    offset = 0.0 if zero_bin else 1.0
    for r, i in enumerate(idx):
        for g, b in zip(cells.genes[i].tolist(), cells.bins[i].tolist(), strict=True):
            c = lookup.get(g)
            if c is not None:
                out[r, c] = b + offset
    return out


def split_halves(n: int, seed: int) -> tuple[list[int], list[int]]:
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[::2].tolist()), sorted(perm[1::2].tolist())


def generation_eval(
    cell_model: CellModel, cells: EvalCells, fit_cells: EvalCells, max_cells: int, max_genes: int, zero_bin: bool
) -> tuple[dict, dict[str, np.ndarray]]:
    """(metrics, PCA coordinates of A, of the held-out real cells B and of the generated cells), in the PCA
    fitted on ``fit_cells``."""
    seed = cell_model.seed
    a, b = split_halves(len(cells), seed)
    a, b = a[:max_cells], b[:max_cells]
    generated = cell_model.generate(cells, b)
    columns = top_genes(cells, max_genes)
    real_a, real_b = dense(cells, a, columns, zero_bin), dense(cells, b, columns, zero_bin)
    gen = dense(generated, range(len(b)), columns, zero_bin)
    fit = dense(fit_cells, range(len(fit_cells)), columns, zero_bin)
    pca = PCA.fit(fit, n_components=min(50, len(fit_cells) - 1, len(columns)))
    metrics = {
        "generated": generation_metrics(real_a, gen, pca, seed=seed),
        "reference": generation_metrics(real_a, real_b, pca, seed=seed),
        "num_real": len(a),
        "num_generated": len(b),
        "num_genes": len(columns),
        "pca_fit_cells": len(fit_cells),
        **cell_model.sampler(),
    }
    coordinates = {"real": pca.transform(real_a), "held_out": pca.transform(real_b), "generated": pca.transform(gen)}
    return metrics, coordinates


def treatment_keys(cells: EvalCells) -> np.ndarray:
    """Per cell its treatment: the drug, and ``|dose`` when the cells carry doses."""
    drug = np.asarray(cells.metadata["drug"])
    if not any(cells.metadata.get("dose", [])):
        return drug
    return np.array([f"{d}|{c}" for d, c in zip(drug, cells.metadata["dose"], strict=True)])


def has_treatments(cells: EvalCells, control: str) -> bool:
    """Whether the cells carry cell lines and drugs with both control and treated cells."""
    drug = set(cells.metadata.get("drug", []))
    return "cell_line_id" in cells.metadata and control in drug and bool(drug - {control, ""})


def _by_line(x: np.ndarray, line: np.ndarray, treatment: np.ndarray, drug: np.ndarray, control: str, min_cells: int):
    """``{line: LineCells}`` of the rows of ``x``: lines with >= ``min_cells`` controls, treatments with as many."""
    out = {}
    for ln in np.unique(line):
        ctrl = (line == ln) & (drug == control)
        if ctrl.sum() < min_cells:
            continue
        treated = {}
        for key in np.unique(treatment[(line == ln) & (drug != control) & (drug != "")]):
            rows = (line == ln) & (treatment == key)
            if rows.sum() >= min_cells:
                treated[str(key)] = x[rows]
        out[str(ln)] = LineCells(x[ctrl], treated)
    return out


def _summary(groups: dict[str, dict], seed: int) -> dict:
    """Means over groups of every metric, each with its 95% bootstrap interval over groups."""
    weights = resample_weights(len(groups), seed=seed)
    values = {m: np.array([g[m] for g in groups.values()], np.float64) for m in METRICS}
    return {
        "mean": {m: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for m, v in values.items()},
        "ci95": {m: mean_interval(v, weights) for m, v in values.items()},
        "groups": groups,
    }


def perturbation_eval(
    cell_model: CellModel,
    cells: EvalCells,
    train: EvalCells,
    max_length: int,
    max_cells: int,
    max_genes: int,
    zero_bin: bool,
    control: str = "DMSO_TF",
    min_cells: int = 3,
    top_k: int = 50,
) -> tuple[dict, np.ndarray, np.ndarray] | None:
    """(metrics, real A effects, model effects, both concatenated over the scored groups); None without groups.

    ``cells`` and ``train`` are whole cells (collated without a gene limit): a random subset of a long cell
    would turn absence from the subset into apparent non-expression, noise that swamps every effect. The
    model generates them in chunks of at most ``max_length`` genes (:func:`generate_whole`).

    Predictors, each scored against half A's real cells per (cell line, treatment) group: ``model``
    (counterfactual generation, see the module docstring), ``control_mean`` (every treated cell predicted as
    the mean control cell of its line in the train split: no effect), ``perturbation_mean`` (as the mean of
    all treated cells of its line in the train split: the average drug effect) and ``real_half`` (half B's
    real cells: the ceiling finite data allow). A group is scored when both halves hold >= ``min_cells`` of
    its cells, its line has >= ``min_cells`` controls in both halves and in train, and the model generated it.
    """
    if not has_treatments(cells, control) or not has_treatments(train, control):
        return None
    line, drug, treatment = (
        np.asarray(cells.metadata["cell_line_id"]),
        np.asarray(cells.metadata["drug"]),
        treatment_keys(cells),
    )
    seed = cell_model.seed
    a, b = (np.asarray(h) for h in split_halves(len(cells), seed))
    columns = top_genes(cells, max_genes)
    x = dense(cells, range(len(cells)), columns, zero_bin)
    real_a = _by_line(x[a], line[a], treatment[a], drug[a], control, min_cells)
    real_b = _by_line(x[b], line[b], treatment[b], drug[b], control, min_cells)
    t_line, t_drug = np.asarray(train.metadata["cell_line_id"]), np.asarray(train.metadata["drug"])
    fit = dense(train, range(len(train)), columns, zero_bin)
    fit_lines = _by_line(fit, t_line, treatment_keys(train), t_drug, control, min_cells)
    scored = {
        ln: sorted(set(real_a[ln].treated) & set(real_b[ln].treated))
        for ln in set(real_a) & set(real_b) & set(fit_lines)
    }
    scored = {ln: keys for ln, keys in scored.items() if keys}
    rng = np.random.default_rng(seed)
    wanted = [i for i in b.tolist() if line[i] in scored and treatment[i] in scored[line[i]]]
    treated = sorted(rng.permutation(wanted)[:max_cells].tolist())
    controls = {ln: [i for i in b.tolist() if line[i] == ln and drug[i] == control] for ln in scored}
    ctrl = sorted(i for rows in controls.values() for i in rows)[:max_cells]
    if not treated:
        return None
    panels = [int(rng.choice(controls[line[i]])) for i in treated]
    drawn_t = generate_whole(cell_model, cells, treated, panels, max_length)
    drawn_c = generate_whole(cell_model, cells, ctrl, ctrl, max_length)
    gen_t = dense(drawn_t, range(len(treated)), columns, zero_bin)
    gen_c = dense(drawn_c, range(len(ctrl)), columns, zero_bin)
    generated = _by_line(
        np.vstack([gen_t, gen_c]), line[treated + ctrl], treatment[treated + ctrl], drug[treated + ctrl], control, 1
    )
    scored = {ln: [k for k in keys if ln in generated and k in generated[ln].treated] for ln, keys in scored.items()}
    scored = {ln: keys for ln, keys in scored.items() if keys}

    def constant(ln: str, vector: np.ndarray) -> LineCells:  # cell-eval's baselines: one vector per treated cell
        size = {k: len(real_a[ln].treated[k]) for k in scored[ln]}
        return LineCells(fit_lines[ln].control, {k: np.tile(vector, (n, 1)) for k, n in size.items()})

    predictors = {
        "model": generated,
        "control_mean": {ln: constant(ln, fit_lines[ln].control.mean(0)) for ln in scored},
        "perturbation_mean": {
            ln: constant(ln, np.vstack(list(fit_lines[ln].treated.values())).mean(0)) for ln in scored
        },
        "real_half": real_b,
    }
    truth = {ln: LineCells(real_a[ln].control, {k: real_a[ln].treated[k] for k in keys}) for ln, keys in scored.items()}
    results = {}
    for name, predicted in predictors.items():
        groups = {}
        for ln in sorted(scored):
            for key, values in score_line(truth[ln], predicted[ln], top_k).items():
                groups[f"{ln}|{key}"] = values
        results[name] = _summary(groups, seed)
    metrics = {
        "num_groups": sum(len(k) for k in scored.values()),
        "top_k": top_k,
        "control": control,
        "num_generated": len(treated) + len(ctrl),
        "predictors": results,
    }
    real_effect = [
        truth[ln].treated[k].mean(0) - truth[ln].control.mean(0) for ln in sorted(scored) for k in scored[ln]
    ]
    model_effect = [
        generated[ln].treated[k].mean(0) - generated[ln].control.mean(0) for ln in sorted(scored) for k in scored[ln]
    ]
    return metrics, np.concatenate(real_effect), np.concatenate(model_effect)
