"""Evaluation cells: collated once, then re-packed into model batches in any grouping.

Collation (binning, random gene subset of long cells, added zero genes) happens exactly once per cell with a
freshly seeded collator, so every predictor, every mask rate and the generation panels see the very same
(gene, bin) pairs, whatever the batch order. :func:`pack` turns any subset of cells back into the
collator's batch layout, optionally with other condition labels (counterfactual generation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ddsc.data.batch_layout import model_batch, pad_cells
from ddsc.data.collator import CellCollator
from ddsc.data.tokens import ExpressionTokens


@dataclass
class EvalCells:
    """Collated cells: per cell its id, gene ids, bins and raw counts (real positions only), condition ids and
    metadata. ``counts`` is None for cells that have no counts of their own (generated cells, panels)."""

    cell_ids: list[str]
    genes: list[np.ndarray]  # int64 per cell
    bins: list[np.ndarray]  # int64 per cell, 0..K-1
    cond: np.ndarray  # [N, W] the collator's ``cond`` rows (``ddsc.model.conditions``)
    metadata: dict[str, list[str]]  # metadata columns present in the samples, one string per cell
    counts: list[np.ndarray] | None = None  # float64 per cell: the raw count behind each bin

    def __len__(self) -> int:
        return len(self.cell_ids)

    def pairs(self, idx: Sequence[int] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        idx = range(len(self)) if idx is None else idx
        return [(self.genes[i], self.bins[i]) for i in idx]

    def subset(self, idx: Sequence[int]) -> EvalCells:
        idx = list(idx)
        return EvalCells(
            [self.cell_ids[i] for i in idx],
            [self.genes[i] for i in idx],
            [self.bins[i] for i in idx],
            self.cond[idx],
            {c: [v[i] for i in idx] for c, v in self.metadata.items()},
            None if self.counts is None else [self.counts[i] for i in idx],
        )


def fresh_collator(collator: CellCollator, seed: int, max_length: int | None = None) -> CellCollator:
    """A copy of ``collator`` with a new seed and an unused generator, so collation is reproducible
    (``max_length``: another gene limit, e.g. a huge one to keep whole cells)."""
    return CellCollator(
        max_length=collator.max_length if max_length is None else max_length,
        binning=collator.binning,
        labels=collator.labels,
        conditions=collator.specs,
        seed=seed,
        gene_vocab_size=collator.gene_vocab_size,
    )


METADATA = ("cell_line_id", "drug", "dose", "plate", "sample")


def collate_cells(
    collator: CellCollator, samples: Sequence[dict], batch_size: int = 256, columns: Sequence[str] = ()
) -> EvalCells:
    """Collate ``samples`` in order (fixed chunks) and keep each cell's real positions, its counts and the
    metadata columns present in the samples (``METADATA`` and the extra ``columns``, e.g. labels to score
    embeddings with)."""
    cell_ids, genes, bins, counts, cond = [], [], [], [], []
    columns = [c for c in dict.fromkeys([*METADATA, *columns]) if samples and c in samples[0]]
    metadata: dict[str, list[str]] = {c: [] for c in columns}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = collator(list(chunk))
        for row, sample in enumerate(chunk):
            real = batch["real"][row]
            cell_ids.append(str(sample["cell_id"]))
            genes.append(batch["gene_ids"][row, real].numpy().astype(np.int64))
            bins.append(batch["expr"][row, real].numpy().astype(np.int64))
            counts.append(batch["counts"][row, real].numpy().astype(np.float64))
            for c in columns:
                metadata[c].append(str(sample.get(c, "")))
        cond.append(batch["cond"].numpy())
    cond_arr = np.concatenate(cond) if cond else np.zeros((0, len(collator.conditions)), np.int64)
    return EvalCells(cell_ids, genes, bins, cond_arr, metadata, counts)


def pack(cells: EvalCells, idx: Sequence[int], tokens: ExpressionTokens, cond: np.ndarray | None = None) -> dict:
    """Batch dict (collator layout) for cells ``idx``; ``cond`` [len(idx), C] replaces their labels if given."""
    gene_ids, values, valid = pad_cells([cells.genes[i] for i in idx], [cells.bins[i] for i in idx])
    labels = cells.cond[list(idx)] if cond is None else np.asarray(cond, dtype=cells.cond.dtype)
    return model_batch(gene_ids, values.long(), valid, tokens, torch.from_numpy(labels))


def length_batches(cells: EvalCells, idx: Sequence[int], batch_size: int) -> list[list[int]]:
    """``idx`` grouped into batches of similar length (less padding, faster on CPU), deterministic order."""
    idx = list(idx)
    order = sorted(idx, key=lambda i: (len(cells.genes[i]), i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


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
