"""The raw-count rule shared by data preparation (``anndata_to_mds.py``) and model use (``ddsc impute``,
``embed``, ``evaluate``): the model's bins are defined on raw UMI counts.

Normalised or scaled values (CPM, log1p, z-scores: fractional or negative) binned as if they were counts give
bins that mean something else, silently. So both paths refuse them with the same check, naming the first
offending cell and gene, unless the user asks to round explicitly (``--round-counts``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ddsc.errors import InputError

ADVICE = (
    "raw integer counts are required (this looks normalised or scaled); use --layer to pick a counts layer "
    "(e.g. raw or counts), or --round-counts to round anyway"
)


def gene_names(ensembl_ids: Sequence[str], symbols: Sequence[str]) -> list[str]:
    """How a message names each gene: its symbol, else its Ensembl id."""
    return [symbol or ensembl for ensembl, symbol in zip(ensembl_ids, symbols, strict=True)]


class NotRawCountsError(InputError, ValueError):
    """The matrix holds normalised / scaled values, not raw integer counts."""


def check_raw_counts(
    values: np.ndarray,
    offsets: np.ndarray,
    columns: np.ndarray,
    cell_names: Sequence[str],
    gene_names: Sequence[str],
    where: str,
    round_counts: bool = False,
) -> np.ndarray:
    """``values`` of a CSR block (``offsets`` per cell, ``columns`` per value) as raw counts, or an error.

    Integer values pass as they are; float values must be non-negative integers (NaN fails), or are rounded
    when ``round_counts``. ``cell_names`` are the block's cells, ``gene_names`` the matrix's columns, ``where``
    names the matrix (file, layer) in the message.
    """
    if values.dtype.kind != "f":
        return values
    if round_counts:
        return np.rint(values)
    bad = np.flatnonzero((values != np.floor(values)) | (values < 0))
    if bad.size:
        first = int(bad[0])
        cell = int(np.searchsorted(offsets, first, side="right")) - 1
        gene = gene_names[int(columns[first])]
        raise NotRawCountsError(
            f"{where}: cell {cell_names[cell]!r}, gene {gene!r} has value {float(values[first]):g}: {ADVICE}"
        )
    return values
