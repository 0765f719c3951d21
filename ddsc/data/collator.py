"""MDS samples -> model batches: ``[<cls>] + up to max_length genes`` per cell, binned and padded.

Everything after the per-sample concatenation is a handful of tensor ops on the padded ``[B, N]`` batch
(histogram binning, optional zero genes) plus one random draw per cell for the subset: no Python loop per gene.
Binning happens on the *whole* cell before subsetting: a cell's bins do not depend on which random subset
of its genes the model sees (and inference on the full cell agrees with training).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ddsc.data.batch_layout import model_batch, pad_cells
from ddsc.data.binning import bin_counts
from ddsc.data.binning_config import BinningConfig
from ddsc.data.labels import LabelVocab
from ddsc.data.tokens import FIRST_GENE_ID, ExpressionTokens
from ddsc.model.conditions import ConditionValueError, encode_conditions
from ddsc.model.config import ConditionConfig


class CellCollator:
    """Turns a list of MDS samples into the batch dict the model, the loss and the samplers consume.

    Output: the layout of ``ddsc.data.batch_layout`` with ``counts`` (B cells, ``L = 1 + min(max_length, longest
    cell)``, ``expr`` the clean bins), ``cond`` in the layout of ``ddsc.model.conditions`` (int64 label ids when all are
    labels, 0 = null / unknown). A condition given by name only is a label condition. Molecule and scalar
    conditions are read from their ``column`` and are required: a cell without a parsable value is an error
    naming the cell (training checks the dataset's distinct values up front, ``check_condition_values``).

    ``gene_vocab_size`` is needed only when ``binning.zero_fraction > 0``: unexpressed genes are drawn
    uniformly from the gene ids ``FIRST_GENE_ID..gene_vocab_size-1`` that the cell does not express.
    """

    def __init__(
        self,
        max_length: int,
        binning: BinningConfig,
        labels: LabelVocab | None = None,
        conditions: Sequence[ConditionConfig | str] = (),
        seed: int = 0,
        gene_vocab_size: int | None = None,
    ):
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        specs = [ConditionConfig(c) if isinstance(c, str) else c for c in conditions]
        label_columns = [c.name for c in specs if c.kind == "label"]
        if label_columns and labels is None:
            raise ValueError(f"conditions {label_columns} need a label vocabulary (data.labels)")
        for column in label_columns:
            labels.num_labels(column)  # fails early, naming the column, if labels.json lacks it
        if binning.zero_fraction > 0 and (gene_vocab_size is None or gene_vocab_size <= FIRST_GENE_ID):
            raise ValueError("binning.zero_fraction > 0 needs gene_vocab_size (to draw unexpressed genes)")
        self.max_length = max_length
        self.binning = binning
        self.tokens = ExpressionTokens(binning.num_bins)
        self.labels = labels
        self.specs = tuple(specs)
        self.conditions = tuple(c.name for c in specs)
        self.seed = seed
        self.gene_vocab_size = gene_vocab_size

    def batch_rng(self, samples: list[dict]) -> np.random.Generator:
        """The generator of one batch's random choices, seeded by (seed, a digest of the batch's cells).

        A function of the batch alone, not of how many batches a worker has collated: an autoresumed run (fresh
        workers) draws the same gene subsets as the uninterrupted run, while reshuffled epochs, other ranks and
        other workers (different cells) still draw differently.
        """
        digest = hashlib.blake2b(digest_size=16)
        for sample in samples:
            digest.update(str(sample.get("cell_id", "")).encode())
            digest.update(np.ascontiguousarray(sample["genes"]).tobytes())
        return np.random.default_rng([self.seed, int.from_bytes(digest.digest(), "little")])

    def bins_for(self, counts: Tensor, real: Tensor, library_size: Tensor | None = None) -> Tensor:
        """Expression tokens (int64) of user counts [B, N]: bins at ``real`` positions, ``tokens.pad`` elsewhere.

        Each row is binned as a whole cell (``library_size`` overrides the row total for ``global_log1p``).
        """
        bins = bin_counts(counts, real, self.binning, library_size=library_size)
        return torch.where(real, bins, torch.full_like(bins, self.tokens.pad))

    def __call__(self, samples: list[dict]) -> dict[str, Tensor]:
        if not samples:
            raise ValueError("CellCollator: empty list of samples")
        cell_genes, cell_counts, valid = pad_cells([s["genes"] for s in samples], [s["counts"] for s in samples])
        rng = self.batch_rng(samples)
        if self.binning.zero_fraction > 0:
            zero_genes, zero_valid = self._zero_genes(cell_genes, valid, rng)
            cell_genes = torch.cat([cell_genes, zero_genes], dim=1)
            cell_counts = torch.cat([cell_counts, torch.zeros(zero_genes.shape, dtype=cell_counts.dtype)], dim=1)
            valid = torch.cat([valid, zero_valid], dim=1)
        index, real = self._subset(valid, rng)
        counts = torch.where(real, cell_counts.gather(1, index), 0)
        bins = bin_counts(counts, real, self.binning, cell_counts=cell_counts, cell_real=valid)
        genes = cell_genes.gather(1, index)
        return model_batch(genes, bins, real, self.tokens, self._encode_conditions(samples), counts=counts)

    def _subset(self, valid: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """Indices [B, L'] of a uniform random subset of at most ``max_length`` valid positions per cell.

        The kept positions stay in their original order (a cell that fits comes out unchanged), padding last.
        One numpy draw per cell (not per gene): cheaper than any batched top-k over random keys. The draw is of
        indices without shuffling them (``shuffle=False``, they are sorted anyway): a third of the subset's cost.
        """
        valid = valid.numpy()
        width = min(self.max_length, int(valid.sum(axis=1).max(initial=0)))
        index = np.zeros((len(valid), width), dtype=np.int64)
        real = np.zeros((len(valid), width), dtype=bool)
        for i, row in enumerate(valid):
            positions = np.flatnonzero(row)
            if len(positions) > width:
                positions = np.sort(positions[rng.choice(len(positions), width, replace=False, shuffle=False)])
            index[i, : len(positions)] = positions
            real[i, : len(positions)] = True
        return torch.from_numpy(index), torch.from_numpy(real)

    def _zero_genes(self, gene_ids: Tensor, valid: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """Unexpressed genes to add: ids [B, M] and which of them to use [B, M].

        Cell ``i`` with ``n_i`` expressed genes gets ``round(n_i * f / (1 - f))`` distinct genes it does not
        express, so a fraction ``f = zero_fraction`` of its genes are zeros. Candidates are drawn with
        replacement and filtered (already expressed or repeated), with headroom; in the rare case the filter
        leaves too few, the cell gets fewer zero genes.
        """
        f = self.binning.zero_fraction
        n = valid.sum(dim=1)
        available = self.gene_vocab_size - FIRST_GENE_ID - n
        wanted = torch.minimum(torch.round(n * (f / (1 - f))).long(), available)
        draws = int(wanted.max()) * 5 // 4 + 16
        candidates = torch.from_numpy(rng.integers(FIRST_GENE_ID, self.gene_vocab_size, (len(n), draws)))
        expressed = gene_ids.masked_fill(~valid, self.gene_vocab_size).sort(dim=1).values
        if expressed.shape[1] == 0:
            expressed = torch.full((len(n), 1), self.gene_vocab_size)
        slot = torch.searchsorted(expressed, candidates).clamp(max=expressed.shape[1] - 1)
        is_expressed = expressed.gather(1, slot) == candidates
        ordered, order = candidates.sort(dim=1)
        repeat_sorted = torch.cat([torch.zeros(len(n), 1, dtype=torch.bool), ordered[:, 1:] == ordered[:, :-1]], 1)
        is_repeat = torch.empty_like(repeat_sorted).scatter_(1, order, repeat_sorted)
        usable = ~is_expressed & ~is_repeat
        return candidates, usable & (usable.cumsum(dim=1) <= wanted[:, None])

    def _encode_conditions(self, samples: list[dict]) -> Tensor:
        values = {c.name: [str(s.get(c.source, "")) for s in samples] for c in self.specs}
        label_ids = self.labels.encode if self.labels is not None else None
        try:
            cond = encode_conditions(self.specs, values, len(samples), label_ids, required=True)
        except ConditionValueError as err:
            raise ValueError(f"cell {samples[err.row].get('cell_id', err.row)!r}: {err}") from None
        return torch.from_numpy(cond)
