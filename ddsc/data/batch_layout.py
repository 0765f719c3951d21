"""The model batch layout, ``[<cls>] + genes`` per row, built in one place.

The collator (training), evaluation (re-packed cells) and inference (AnnData rows, generated panels) all feed
the DiT the same dict; they differ only in where the genes and their expression tokens come from. Keys
(``R`` rows, ``L = 1 + longest row``):

- ``gene_ids`` int64 [R, L]: ``<cls>`` at 0, ``<pad>`` at padding;
- ``expr`` int64 [R, L]: expression tokens (bins, ``tokens.mask``), ``tokens.cls`` at 0, ``tokens.pad`` at padding;
- ``real`` bool [R, L]: gene positions; ``attention_mask`` bool [R, L]: ``<cls>`` and the gene positions;
- ``cond`` [R, W]: the conditions (``ddsc.model.conditions``); ``counts`` float32 [R, L] when given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ddsc.data.tokens import GENE_CLS, GENE_PAD, ExpressionTokens


def pad_cells(genes: Sequence[np.ndarray], counts: Sequence[np.ndarray]) -> tuple[Tensor, Tensor, Tensor]:
    """Ragged per-cell arrays -> (gene ids int64 [B, N], counts [B, N], valid bool [B, N]).

    Integer counts stay integers, at least int32 (MDS stores uint16 or int32 per cell, and torch has few ops
    for uint16): the quantile binning ranks them with a histogram. Other counts become float32.
    """
    lengths = np.fromiter((len(g) for g in genes), dtype=np.int64, count=len(genes))
    width = int(lengths.max(initial=0))
    valid = np.arange(width)[None, :] < lengths[:, None]
    flat_counts = np.concatenate(counts)
    gene_ids = np.full((len(genes), width), GENE_PAD, dtype=np.int64)
    integer = flat_counts.dtype.kind in "iu"
    values = np.zeros(
        (len(genes), width), dtype=np.promote_types(flat_counts.dtype, np.int32) if integer else np.float32
    )
    if width:
        gene_ids[valid] = np.concatenate(genes)  # row-major fill: cell by cell, in order
        values[valid] = flat_counts
    return torch.from_numpy(gene_ids), torch.from_numpy(values), torch.from_numpy(valid)


def cell_layout(gene_ids: Tensor, real: Tensor, counts: Tensor | None = None) -> dict[str, Tensor]:
    """``gene_ids``, ``real``, ``attention_mask`` (and ``counts``) of the layout from the gene positions alone
    ([R, N], any values at padding): ``<cls>`` prepended, padding set to ``<pad>`` and count 0. The latent
    family's encoder reads only these; ``model_batch`` adds the expression tokens and the conditions."""
    rows = len(gene_ids)
    first = torch.ones(rows, 1, dtype=torch.bool, device=real.device)
    layout = {
        "gene_ids": torch.cat(
            [torch.full_like(first, GENE_CLS, dtype=torch.long), gene_ids.masked_fill(~real, GENE_PAD)], 1
        ),
        "real": torch.cat([~first, real], dim=1),
        "attention_mask": torch.cat([first, real], dim=1),
    }
    if counts is not None:
        layout["counts"] = torch.cat(
            [torch.zeros(rows, 1, device=counts.device), counts.float().masked_fill(~real, 0)], 1
        )
    return layout


def model_batch(
    gene_ids: Tensor,
    expr: Tensor,
    real: Tensor,
    tokens: ExpressionTokens,
    cond: Tensor,
    counts: Tensor | None = None,
) -> dict[str, Tensor]:
    """The batch dict from the gene positions alone ([R, N], any values at padding): ``cell_layout`` plus the
    expression tokens (``tokens.cls`` at 0, ``tokens.pad`` at padding) and ``cond``."""
    first = torch.full((len(expr), 1), tokens.cls, dtype=torch.long, device=expr.device)
    return {
        **cell_layout(gene_ids, real, counts),
        "expr": torch.cat([first, expr.masked_fill(~real, tokens.pad)], 1),
        "cond": cond,
    }
