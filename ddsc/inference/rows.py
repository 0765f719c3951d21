"""AnnData cells -> model rows: whole cells, cut into deterministic chunks when longer than ``max_genes``.

A cell's positions are its non-zero entries plus the entries to predict (which may be zero or unknown). Bins
come from the *observed* entries only: a hidden count must not leak into the bin edges of the counts that
stay visible. A cell with more positions than the model saw in training is split into chunks of at most
``max_genes`` positions (``gene_chunks``: a function of the seed and the cell's genes), every chunk seeing
the same per-cell bins, so every entry is predicted (and embeddings combine the chunks) instead of dropping
genes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ddsc.data.batch_layout import model_batch, pad_cells
from ddsc.data.binning import bin_values
from ddsc.data.collator import CellCollator


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a fixed hash of uint64 values (numpy's uint64 arithmetic wraps mod 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _gene_keys(tokens: np.ndarray, seed: int) -> np.ndarray:
    """A uint64 key per gene of a cell: a hash of (seed, the cell's set of genes, the gene) and nothing else, not
    the order the genes come in (AnnData's var order), the cell's row or the other cells of its batch."""
    seed_key = _mix64(np.array([seed % 2**64], dtype=np.uint64))
    genes = _mix64(np.asarray(tokens).astype(np.uint64) ^ seed_key)
    cell_key = _mix64(genes.sum(dtype=np.uint64, keepdims=True))  # a sum: the same for any order of the genes
    return _mix64(genes ^ cell_key)


def gene_chunks(tokens: np.ndarray, max_length: int, seed: int) -> list[np.ndarray]:
    """A cell's positions as ``ceil(n / max_length)`` chunks of near-equal size, together all of its genes.

    The positions are ordered by ``_gene_keys`` and cut along that order, so a cell gets the same model rows,
    hence the same embedding and imputation, wherever it is; different cells are cut differently.
    """
    order = np.argsort(_gene_keys(tokens, seed), kind="stable")
    return np.array_split(order, max(1, math.ceil(len(order) / max_length)))


def held_out_half(tokens: np.ndarray, seed: int) -> np.ndarray:
    """Bool per position: a seeded half of a cell's genes; ``embed`` predicts it from the other half, then the
    other half from it (``_gene_keys`` under another seed than the chunks: about half of every chunk)."""
    return (_gene_keys(tokens, seed ^ 0x5EED) >> np.uint64(63)).astype(bool)


@dataclass
class CellEntries:
    """Cells as ragged positions (flat arrays, CSR-style ``offsets``): the entries the model sees per cell."""

    offsets: np.ndarray  # int64 [n_cells + 1]
    tokens: np.ndarray  # int64 [nnz] gene token ids
    counts: np.ndarray  # float32 [nnz] (0 or unknown at hidden entries)
    columns: np.ndarray  # int64 [nnz] AnnData var column of each entry
    hidden: np.ndarray  # bool [nnz] entries to predict

    @property
    def n_cells(self) -> int:
        return len(self.offsets) - 1

    def cell(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))


@dataclass
class RowBatch:
    """Model rows (cells or chunks of cells) ready for the DiT, plus where each position came from."""

    batch: dict[str, Tensor]  # the ``ddsc.data.batch_layout`` dict
    observed: Tensor  # bool [R, L]
    flat: Tensor  # int64 [R, L]: index into CellEntries' flat arrays, -1 at cls / padding
    cell: Tensor  # int64 [R]: index of the row's cell within the cell batch
    values: Tensor  # float64 [B, K]: bin_values of the cell batch

    def to(self, device: torch.device) -> RowBatch:
        batch = {k: v.to(device) for k, v in self.batch.items()}
        return RowBatch(batch, self.observed.to(device), self.flat, self.cell, self.values)


def model_rows(
    cells: CellEntries, index: np.ndarray, cond: Tensor, collator: CellCollator, max_length: int, seed: int
) -> RowBatch:
    """The rows of cells ``index`` (``cond``: their conditions; chunks of at most ``max_length`` genes), binned
    exactly as in training (``collator.bins_for``) from the observed entries, hidden entries masked."""
    slices = [cells.cell(i) for i in index]
    gene_ids, counts, valid = pad_cells([cells.tokens[s] for s in slices], [cells.counts[s] for s in slices])
    hidden = torch.zeros_like(valid)
    hidden[valid] = torch.from_numpy(np.concatenate([cells.hidden[s] for s in slices] or [np.zeros(0, bool)]))
    observed = valid & ~hidden
    library = (counts * observed).sum(dim=1, dtype=torch.float64)
    bins = collator.bins_for(counts, observed, library)
    expr = torch.where(observed, bins, torch.full_like(bins, collator.tokens.mask))
    values = bin_values(counts, observed, collator.binning, library)

    chunks = [  # (cell in batch, positions within the cell)
        (b, part) for b, s in enumerate(slices) for part in gene_chunks(cells.tokens[s], max_length, seed)
    ]
    position = torch.full((len(chunks), max(len(p) for _, p in chunks)), -1, dtype=torch.long)
    for r, (_, part) in enumerate(chunks):
        position[r, : len(part)] = torch.from_numpy(part)
    cell = torch.tensor([b for b, _ in chunks], dtype=torch.long)
    real = position >= 0
    at = (cell[:, None], position.clamp(min=0))
    batch = model_batch(gene_ids[at], expr[at], real, collator.tokens, cond.cpu()[cell])
    flat = torch.where(real, torch.as_tensor(cells.offsets[index])[cell][:, None] + at[1], -1)
    no_cls = torch.zeros(len(chunks), 1, dtype=torch.bool)
    return RowBatch(
        batch,
        torch.cat([no_cls, real & observed[at]], dim=1),
        torch.cat([torch.full((len(chunks), 1), -1), flat], dim=1),
        cell,
        values,
    )
