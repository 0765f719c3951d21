"""Generation and perturbation evaluation, each next to its real-vs-held-out-real reference value.

The held-out evaluation cells are split in two halves by a seeded permutation: A (the "real" set every
metric compares against) and B. Generated cells take B's gene panels and labels with every bin generated
from scratch, so generated-vs-A and the reference B-vs-A differ only in where the bins came from: a perfect
generator scores like the reference, not like 0.

Perturbation (data with drug labels) is counterfactual: each treated cell of B is generated on the gene panel
of a random control cell of its cell line, with the treated cell's labels, and B's control cells are
regenerated with their own. Generated delta = mean(generated treated) - mean(generated control) per
(cell line, drug), so it comes from the condition alone. It is compared with A's real delta (reference: B's
real delta). With nonzero-only binning the part of a real effect that switches genes on or off cannot be
generated on a fixed panel, which caps the generated score below the reference.

Cells are compared as dense vectors over the ``max_genes`` genes most often present in the evaluation
cells: value ``bin + 1`` where the gene is in the cell and 0 where it is not, or, when the binning reserves
bin 0 for unexpressed genes (``zero_fraction > 0``), the bin itself with absent genes as 0.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from ddsc.data.tokens import ExpressionTokens
from ddsc.diffusion.samplers import sample
from ddsc.eval.cells import EvalCells, length_batches, pack
from ddsc.eval.metrics import PCA, delta_agreement, generation_metrics, pseudobulk_deltas
from ddsc.eval.settings import SamplerSettings


def generate_bins(
    model: Callable,
    cells: EvalCells,
    idx: list[int],
    tokens: ExpressionTokens,
    settings: SamplerSettings,
    cond: np.ndarray | None = None,
    panels: list[int] | None = None,
    device: torch.device | str = "cpu",
    diffusion_cfg=None,
) -> EvalCells:
    """Generated cells: every bin of cell ``panels[j]``'s genes generated with labels ``cond[j]`` (default:
    cell ``idx[j]``'s own). Metadata and ids follow ``idx``."""
    panels = list(idx) if panels is None else list(panels)
    labels = cells.cond[idx] if cond is None else np.asarray(cond, np.int64)
    genes: list[np.ndarray] = [np.zeros(0, np.int64)] * len(idx)
    bins: list[np.ndarray] = [np.zeros(0, np.int64)] * len(idx)
    panel_cells = EvalCells(
        [cells.cell_ids[p] for p in panels],
        [cells.genes[p] for p in panels],
        [cells.bins[p] for p in panels],
        labels,
        {},
    )
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    for rows in tqdm(
        length_batches(panel_cells, range(len(panels)), settings.batch_size), desc="generate", unit="batch"
    ):
        batch = {k: v.to(device) for k, v in pack(panel_cells, rows, tokens).items()}
        out = sample(
            model,
            batch,
            method=settings.method,
            steps=settings.steps,
            temperature=settings.temperature,
            guidance_scale=settings.guidance_scale,
            generator=generator,
            diffusion=diffusion_cfg,
        )
        expr = out.expr.cpu()
        for r, j in enumerate(rows):
            genes[j] = panel_cells.genes[j]
            bins[j] = expr[r, 1 : 1 + len(genes[j])].numpy().astype(np.int64)
    metadata = {c: [v[i] for i in idx] for c, v in cells.metadata.items()}
    return EvalCells([cells.cell_ids[i] for i in idx], genes, bins, labels, metadata)


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
    model: Callable,
    cells: EvalCells,
    tokens: ExpressionTokens,
    settings: SamplerSettings,
    max_cells: int,
    max_genes: int,
    zero_bin: bool,
    device="cpu",
    diffusion_cfg=None,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """(metrics, PCA coordinates of A, of the generated cells)."""
    a, b = split_halves(len(cells), settings.seed)
    a, b = a[:max_cells], b[:max_cells]
    generated = generate_bins(model, cells, b, tokens, settings, device=device, diffusion_cfg=diffusion_cfg)
    columns = top_genes(cells, max_genes)
    real_a, real_b = dense(cells, a, columns, zero_bin), dense(cells, b, columns, zero_bin)
    gen = dense(generated, range(len(b)), columns, zero_bin)
    pca = PCA.fit(real_a, n_components=min(50, len(a) - 1, len(columns)))
    metrics = {
        "generated": generation_metrics(real_a, gen, pca, seed=settings.seed),
        "reference": generation_metrics(real_a, real_b, pca, seed=settings.seed),
        "num_real": len(a),
        "num_generated": len(b),
        "num_genes": len(columns),
        "sampler": settings.method,
        "steps": settings.steps,
    }
    return metrics, pca.transform(real_a), pca.transform(gen)


def perturbation_eval(
    model: Callable,
    cells: EvalCells,
    tokens: ExpressionTokens,
    settings: SamplerSettings,
    max_cells: int,
    max_genes: int,
    zero_bin: bool,
    control: str = "DMSO_TF",
    min_cells: int = 3,
    top_k: int = 50,
    device="cpu",
    diffusion_cfg=None,
) -> tuple[dict, np.ndarray, np.ndarray] | None:
    """(metrics, real A deltas, generated deltas) concatenated over groups; None without usable groups."""
    if not {"cell_line_id", "drug"} <= set(cells.metadata):
        return None
    line = np.asarray(cells.metadata["cell_line_id"])
    drug = np.asarray(cells.metadata["drug"])
    a, b = split_halves(len(cells), settings.seed)
    columns = top_genes(cells, max_genes)
    real_a = pseudobulk_deltas(dense(cells, a, columns, zero_bin), line[a], drug[a], control, min_cells)
    real_b = pseudobulk_deltas(dense(cells, b, columns, zero_bin), line[b], drug[b], control, min_cells)
    rng = np.random.default_rng(settings.seed)
    controls = {ln: [i for i in b if line[i] == ln and drug[i] == control] for ln in np.unique(line[b])}
    treated = [i for i in b if drug[i] != control and drug[i] and controls.get(line[i])]
    treated = sorted(rng.permutation(treated)[:max_cells].tolist())
    ctrl = sorted(i for ln in np.unique(line[treated]) for i in controls[ln])[:max_cells]
    if not treated or not real_a:
        return None
    panels = [int(rng.choice(controls[line[i]])) for i in treated]
    gen_treated = generate_bins(
        model, cells, treated, tokens, settings, panels=panels, device=device, diffusion_cfg=diffusion_cfg
    )
    gen_ctrl = generate_bins(model, cells, ctrl, tokens, settings, device=device, diffusion_cfg=diffusion_cfg)
    gen_x = np.vstack(
        [
            dense(gen_treated, range(len(treated)), columns, zero_bin),
            dense(gen_ctrl, range(len(ctrl)), columns, zero_bin),
        ]
    )
    gen = pseudobulk_deltas(gen_x, np.r_[line[treated], line[ctrl]], np.r_[drug[treated], drug[ctrl]], control, 1)
    metrics = {
        "generated": delta_agreement(real_a, gen, top_k),
        "reference": delta_agreement(real_a, real_b, top_k),
        "num_generated": len(treated) + len(ctrl),
    }
    common = sorted(set(real_a) & set(gen))
    real_vec = np.concatenate([real_a[g] for g in common]) if common else np.zeros(0)
    gen_vec = np.concatenate([gen[g] for g in common]) if common else np.zeros(0)
    return metrics, real_vec, gen_vec
