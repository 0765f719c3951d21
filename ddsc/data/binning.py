"""Raw counts -> expression bins, vectorised over a padded batch of cells.

All methods take a padded ``[B, N]`` tensor of counts and a ``real`` mask and return int64 bins in
``0..K-1`` at real positions (0 elsewhere; the caller writes the special tokens). The quantile method needs
only each value's rank in its cell, which a batched histogram gives for integer counts: no per-cell
``torch.quantile`` loop and no sort, which is what makes the collator fast (bins are still identical).

Bin layout. When ``zero_fraction > 0`` the collator adds unexpressed genes, and bin 0 is reserved for them:
non-zero counts use bins ``1..K-1``. Otherwise non-zero counts use all ``K`` bins. A zero count at a real
position (user data that lists unexpressed genes) always gets bin 0.

Methods (see ``BinningConfig``):

- ``quantile``: per-cell quantiles of the cell's non-zero counts, as in the original DDSC / scGPT. With ``k``
  bins for non-zero counts the cell's edges are ``torch.quantile(nonzero, j / k)`` (linear interpolation) for
  ``j = 1..k-1``, and a count's bin is the number of edges *strictly below* it. Ties: equal counts always
  share one bin, the lowest bin their block of the sorted counts reaches; so the smallest count of a cell is
  always the first non-zero bin, and a cell where half the counts are 1 puts all those 1s in that bin rather
  than spreading them over half the bins. This is deterministic (no random tie breaking), so a cell bins the
  same way in training and at inference.
- ``global_log1p``: ``log1p(count / library_size * target_sum)`` cut into equal-width bins on
  ``[0, max_value]``; comparable across cells. ``library_size`` is the cell's total count over *all* its
  genes (before the collator subsamples ``max_length`` of them).
- ``log_uniform``: equal-width bins of ``log(count)`` on ``[0, log(max_count)]``.
- ``uniform``: equal-width bins of the raw count on ``[0, max_count]``.
Values above the top edge go to the last bin.

The way back, a representative count per bin and cell (``bin_values``), is here too: inference writes it as
the imputed count, evaluation scores its expectation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddsc.data.binning_config import BinningConfig


def nonzero_bins(cfg: BinningConfig) -> tuple[int, int]:
    """``(first, count)``: non-zero counts use bins ``first .. first + count - 1``."""
    first = 1 if cfg.zero_fraction > 0 else 0
    return first, cfg.num_bins - first


HISTOGRAM_LIMIT = 256  # integer counts below this are ranked by a per-cell histogram instead of a sort


def quantile_positions(cell: Tensor, nonzero: Tensor, query: Tensor, num_bins: int) -> Tensor:
    """Per-cell quantile bin (0..num_bins-1) of each query value among its row's ``nonzero`` cell values.

    A value's bin depends only on its rank in the cell (``quantile_bin_index``). Integer counts below
    ``HISTOGRAM_LIMIT`` (nearly all UMI counts) are ranked with one batched histogram (bincount + cumsum),
    linear in the batch size, instead of the per-cell sort of the straightforward implementation. The histogram
    has two extra slots per row, other non-zero values and ignored positions, so it also gives the row sizes:
    the ``[B, N]`` cell is read by a few elementwise ops and one bincount, with no boolean-mask select or bool
    sum (those cost more than the rest together). When a batch has only such small counts (the usual case) the
    bin is a function of (cell, value): it is tabulated for the ``HISTOGRAM_LIMIT`` values and looked up.
    Otherwise the large or non-integer values are sorted and the ranks of the queries counted.
    """
    batch, limit = cell.shape[0], HISTOGRAM_LIMIT
    slot = query
    if cell.is_floating_point():
        small = nonzero & (cell == cell.floor())
        key = torch.where(small, cell.clamp(max=limit), torch.where(nonzero, limit, limit + 1)).long()
        slot = torch.ceil(query)  # the small integers below x are those below ceil(x)
    else:
        key = torch.where(nonzero, cell.clamp(max=limit), limit + 1)  # `limit`: large, sorted below
    slot = slot.clamp(0, limit).long()
    rows = torch.arange(batch, dtype=key.dtype, device=cell.device)[:, None] * (limit + 2)
    histogram = torch.bincount((key + rows).view(-1), minlength=batch * (limit + 2)).view(batch, limit + 2)
    n = histogram[:, : limit + 1].sum(dim=1)
    below_value = torch.nn.functional.pad(histogram[:, :limit].cumsum(dim=1), (1, 0))  # [:, v] = small values < v
    most = int(histogram[:, limit].max()) if batch else 0
    if not most:
        return quantile_bin_index(below_value, n, num_bins).gather(1, slot)
    rest = nonzero & (key == limit)
    ordered = cell.double().masked_fill(~rest, math.inf).topk(most, dim=1, largest=False).values
    below = below_value.gather(1, slot) + torch.searchsorted(ordered, query.double().contiguous(), side="left")
    return quantile_bin_index(below, n, num_bins)


def quantile_bin_index(below: Tensor, n: Tensor, num_bins: int) -> Tensor:
    """Bin (0..num_bins-1) of a cell value with ``below`` smaller non-zero values in a cell of ``n``.

    With ``torch.quantile``'s linear interpolation the edge at ``q_j = j / num_bins`` sits at sorted position
    ``p_j = q_j * (n - 1)``, and for a value ``x`` of the cell, ``edge_j < x`` exactly when
    ``floor(p_j) < below(x)`` (the order statistic after ``floor(p_j)`` is at most ``x``, and interpolating
    towards it stays below ``x``). So the bin, the number of edges strictly below ``x``, needs no edge values,
    only ranks; ``p_j`` is computed with the same float64 arithmetic as ``torch.quantile``.
    """
    q = torch.arange(1, num_bins, dtype=torch.float64, device=below.device) / num_bins
    floor_positions = (q[None, :] * (n[:, None] - 1).clamp(min=0).double()).long()
    return torch.searchsorted(floor_positions, below.contiguous(), side="left")


def bin_counts(
    counts: Tensor,
    real: Tensor,
    cfg: BinningConfig,
    *,
    cell_counts: Tensor | None = None,
    cell_real: Tensor | None = None,
    library_size: Tensor | None = None,
) -> Tensor:
    """Bins (int64 [B, Q]) of ``counts`` (float or int [B, Q]) at ``real`` positions; 0 elsewhere.

    The values are binned relative to their whole cells, ``cell_counts`` / ``cell_real`` ([B, N]; default: the
    counts themselves), so a random subset of a cell bins exactly like the full cell; every value must be one
    of its cell's counts. ``library_size`` ([B], ``global_log1p`` only) defaults to the cells' total count.
    """
    if counts.shape != real.shape or counts.dim() != 2:
        raise ValueError(f"counts {tuple(counts.shape)} and real {tuple(real.shape)} must both be [B, N]")
    if cell_counts is None:
        cell_counts, cell_real = counts, real
    first, k = nonzero_bins(cfg)
    nonzero = real & (counts > 0)
    if cfg.method == "quantile":
        if counts.is_floating_point() != cell_counts.is_floating_point():  # one number type for the ranking
            counts, cell_counts = counts.double(), cell_counts.double()
        cell_nonzero = cell_real & (cell_counts > 0)
        position = quantile_positions(cell_counts, cell_nonzero, counts, k)
    else:
        counts, cell_counts = counts.double(), cell_counts.double()
        if cfg.method == "global_log1p":
            if library_size is None:
                library_size = (cell_counts * cell_real).sum(dim=1)
            scale = cfg.target_sum / library_size.double().clamp(min=1.0)
            fraction = torch.log1p(counts * scale[:, None]) / cfg.max_value
        elif cfg.method == "log_uniform":
            fraction = torch.log(counts.clamp(min=1.0)) / math.log(cfg.max_count)
        elif cfg.method == "uniform":
            fraction = counts / cfg.max_count
        else:
            raise ValueError(f"binning.method: unknown method {cfg.method!r}")
        position = torch.floor(fraction * k).long()
    bins = position.clamp(0, k - 1) + first
    return torch.where(nonzero, bins, torch.zeros_like(bins))


def quantile_bins_reference(counts: Tensor, cfg: BinningConfig) -> Tensor:
    """One cell, the straightforward way (``torch.quantile`` + ``bucketize``): the oracle for tests/benchmarks."""
    first, k = nonzero_bins(cfg)
    counts = counts.double()
    nonzero = counts > 0
    bins = torch.zeros(counts.shape, dtype=torch.int64)
    if nonzero.any():
        q = torch.arange(1, k, dtype=torch.float64) / k
        edges = torch.quantile(counts[nonzero], q)
        bins[nonzero] = torch.bucketize(counts[nonzero], edges, right=False).clamp(max=k - 1) + first
    return bins


def row_quantiles(values: Tensor, valid: Tensor, q: Tensor) -> Tensor:
    """Per-row ``torch.quantile(row[valid], q)`` (linear interpolation), float64 [B, len(q)]; 0 for empty rows."""
    ordered = values.double().masked_fill(~valid, math.inf).sort(dim=1).values
    n = valid.sum(dim=1, keepdim=True)
    ranks = q.double()[None, :] * (n - 1).clamp(min=0)
    below, above = ranks.floor().long(), ranks.ceil().long()
    out = torch.lerp(ordered.gather(1, below), ordered.gather(1, above), ranks - below)
    return out.masked_fill(n == 0, 0.0)


def bin_values(counts: Tensor, observed: Tensor, cfg: BinningConfig, library_size: Tensor) -> Tensor:
    """A representative raw count per bin and cell, float64 [B, K] (the inverse of ``bin_counts``).

    ``quantile``: the cell's observed quantile at the middle of the bin's quantile range; fixed-edge schemes:
    the middle of the bin mapped back to counts. The zero bin (``zero_fraction > 0``) is 0.
    """
    first, k = nonzero_bins(cfg)
    middle = (torch.arange(k, dtype=torch.float64, device=counts.device) + 0.5) / k
    if cfg.method == "quantile":
        # quantiles at j / (2k), j = 1..2k-1: the odd ones are the bin middles (2b + 1) / (2k)
        values = row_quantiles(counts, observed & (counts > 0), middle)
    elif cfg.method == "global_log1p":
        scale = library_size.double().clamp(min=1.0)[:, None] / cfg.target_sum
        values = torch.expm1(middle * cfg.max_value)[None, :] * scale
    elif cfg.method == "log_uniform":
        values = torch.exp(middle * math.log(cfg.max_count)).expand(len(counts), k)
    else:
        values = (middle * cfg.max_count).expand(len(counts), k)
    zeros = torch.zeros(len(counts), first, dtype=torch.float64, device=counts.device)
    return torch.cat([zeros, values], dim=1)
