"""Validated cell records shared by every reader, and the vectorised checks that produce them.

Readers (Tahoe parquet, h5ad, 10x) turn a chunk of their input into ragged arrays (flat gene ids, flat
values, row offsets) and call :func:`validate`. It decides per cell, with numpy over the flat arrays (no
Python loop over genes), and counts every decision so nothing is dropped silently:

* a cell is **rejected** (one reason, the first that applies, in ``REJECT_REASONS`` order) for a NaN /
  infinite, negative, non-integer or int32-overflowing count, or a gene id repeated within the cell
  (ambiguous: which count is right?), or when nothing is left (``empty_cell``);
* an **entry** is dropped (cell kept) for an unknown gene id or a zero count (the schema stores non-zero
  genes only), counted in ``DROP_REASONS`` for cells without a count problem (a cell whose genes are all
  unknown is counted there and then rejected as ``empty_cell``).

Almost every real batch is clean, and validation runs once per gene entry of the whole dataset, so a fast
path first proves that no rule applies with about eight passes over the flat arrays (the per-reason
bookkeeping makes about twenty-five); any doubt falls through to that bookkeeping, which decides per cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ddsc.data.schema import METADATA_COLUMNS

# Cell-level rejections, in priority order. Readers may set the first ones (format problems) before validate.
REJECT_REASONS: tuple[str, ...] = (
    "null_row",
    "length_mismatch",
    "bad_marker",
    "nan_count",
    "negative_count",
    "non_integer_count",
    "count_overflow",
    "duplicate_gene",
    "empty_cell",
)
DROP_REASONS: tuple[str, ...] = ("unknown_gene", "zero_count")
_CODE = {reason: i + 1 for i, reason in enumerate(REJECT_REASONS)}  # 0 = kept
# Counts must be below 2**31. Compare with ``>= INT32_LIMIT``, never ``> 2**31 - 1``: float32 rounds 2**31 - 1
# up to 2**31, so the latter lets 2**31 through (and the cast to int32 then wraps it negative).
INT32_LIMIT = 2**31


@dataclass
class CellBatch:
    """Cells that passed validation, in input order, plus the counts of what did not."""

    cell_ids: list[str]
    offsets: np.ndarray  # int64 [n + 1]: cell i is genes[offsets[i]:offsets[i + 1]]
    genes: np.ndarray  # int32, flat gene token ids
    counts: np.ndarray  # int32, flat raw counts (> 0)
    metadata: dict[str, list[str]]  # every schema.METADATA_COLUMNS, one string per kept cell
    cells_in: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cell_ids)


def reject_codes(n: int) -> np.ndarray:
    """Per-cell rejection codes, all 0 (kept): readers mark format problems with :func:`mark`."""
    return np.zeros(n, dtype=np.int8)


def mark(codes: np.ndarray, rows: np.ndarray, reason: str) -> None:
    """Reject ``rows`` (bool mask) for ``reason`` unless an earlier reason already applies."""
    codes[rows & (codes == 0)] = _CODE[reason]


def _rows_with(flag: np.ndarray, row_of: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(row_of[flag], minlength=n) > 0


def _alive(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per entry: does its cell still stand?"""
    return np.repeat(codes == 0, lengths)


def _clean(
    genes: np.ndarray, values: np.ndarray, offsets: np.ndarray, known: np.ndarray, codes: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """(int32 genes, int32 counts) when every cell passes every rule as it is, else None.

    Clean means: no reader rejection, no empty cell, every gene id known, gene ids strictly increasing
    within each cell (so no duplicate; unsorted cells take the slow path), every count an integer in
    1..2**31 - 1. Float counts are cast to int32 and compared with the original: a NaN, infinite,
    fractional or out-of-range value does not survive the cast unchanged.
    """
    if not len(genes) or codes.any() or np.diff(offsets).min() <= 0:
        return None
    if genes.min() < 0 or genes.max() >= len(known) or not known[genes].all():  # index before the int32 cast:
        return None  # numpy would cast int32 indices back to int64 for the look-up
    genes = genes.astype(np.int32, copy=False)
    increasing = genes[1:] > genes[:-1]
    increasing[offsets[1:-1] - 1] = True  # a cell's first gene may be smaller than the previous cell's last
    if not increasing.all():
        return None
    if values.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            counts = values.astype(np.int32)
        # Compared in the values' own float type, not numpy's int32 x float32 -> float64 promotion (slower):
        # exact, since an integral value below 2**31 survives both casts and anything else changes.
        if not np.equal(counts.astype(values.dtype), values).all():
            return None
    elif values.dtype.kind in "iu" and values.max() < INT32_LIMIT:
        counts = values.astype(np.int32, copy=False)
    else:
        return None
    return (genes, counts) if counts.min() > 0 else None


def validate(
    genes: np.ndarray,
    values: np.ndarray,
    offsets: np.ndarray,
    known: np.ndarray,
    codes: np.ndarray,
    cell_ids: list[str],
    metadata: dict[str, list[str]],
) -> CellBatch:
    """Check ragged cells and return the clean ones. ``known[g]`` is True for valid gene token ids.

    ``codes`` carries rejections already decided by the reader (e.g. a missing Tahoe marker); entries of
    such cells are ignored. ``metadata`` values are per input row and are filtered with the cells.
    """
    n = len(offsets) - 1
    genes = np.asarray(genes)
    values = np.asarray(values)
    clean = _clean(genes, values, offsets, known, codes)
    if clean is not None:
        return CellBatch(
            cell_ids=list(cell_ids),
            offsets=np.asarray(offsets, dtype=np.int64),
            genes=clean[0],
            counts=clean[1],
            metadata={col: list(metadata[col]) for col in METADATA_COLUMNS},
            cells_in=n,
        )
    lengths = np.diff(offsets)
    genes = genes.astype(np.int64, copy=False)
    row_cache: list[np.ndarray] = []

    def row_of() -> np.ndarray:  # entry -> cell index; built only when a slow path needs it
        if not row_cache:
            row_cache.append(np.repeat(np.arange(n, dtype=np.int64), lengths))
        return row_cache[0]

    # Count checks: one combined pass decides whether any cell needs the per-reason bookkeeping.
    finite = np.isfinite(values)
    all_finite = bool(finite.all())
    safe = values if all_finite else np.where(finite, values, 0)
    fractional = safe != np.floor(safe) if values.dtype.kind == "f" else np.zeros(len(safe), dtype=bool)
    if not all_finite or np.any((safe < 0) | (safe >= INT32_LIMIT) | fractional):
        mark(codes, _rows_with(~finite, row_of(), n), "nan_count")
        mark(codes, _rows_with(safe < 0, row_of(), n), "negative_count")
        mark(codes, _rows_with(fractional, row_of(), n), "non_integer_count")
        mark(codes, _rows_with(safe >= INT32_LIMIT, row_of(), n), "count_overflow")

    if len(genes) and genes.min() >= 0 and genes.max() < len(known):
        unknown = ~known[genes]
    else:
        in_range = (genes >= 0) & (genes < len(known))
        unknown = ~in_range
        unknown[in_range] = ~known[genes[in_range]]
    zero = safe == 0
    keep = ~zero & ~unknown
    if codes.any():
        alive = _alive(codes, lengths)
        keep &= alive
        unknown &= alive
        zero &= alive
    dropped = {"unknown_gene": int(np.count_nonzero(unknown)), "zero_count": int(np.count_nonzero(zero & ~unknown))}

    # Duplicates: genes strictly increasing within every cell (the common case) prove there are none in one
    # pass; otherwise sort the kept (row, gene) keys once.
    increasing = np.diff(genes) > 0
    boundaries = offsets[1:-1] - 1
    increasing[boundaries[(boundaries >= 0) & (boundaries < len(increasing))]] = True
    if not increasing.all():
        keys = row_of()[keep] * len(known) + genes[keep]
        sorted_keys = np.sort(keys)
        dup_keys = sorted_keys[1:][np.diff(sorted_keys) == 0]
        dup_rows = np.zeros(n, dtype=bool)
        dup_rows[np.unique(dup_keys // len(known))] = True
        mark(codes, dup_rows, "duplicate_gene")
        keep &= _alive(codes, lengths)

    all_kept = bool(keep.all())
    kept_per_row = lengths if all_kept else np.bincount(row_of()[keep], minlength=n)
    mark(codes, kept_per_row == 0, "empty_cell")
    if not all_kept:
        keep &= _alive(codes, lengths)

    rows = np.flatnonzero(codes == 0)
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(kept_per_row[rows], out=new_offsets[1:])
    rejected = {reason: int(np.count_nonzero(codes == code)) for reason, code in _CODE.items()}
    return CellBatch(
        cell_ids=[cell_ids[i] for i in rows],
        offsets=new_offsets,
        genes=(genes if all_kept else genes[keep]).astype(np.int32),
        counts=(safe if all_kept else safe[keep]).astype(np.int32),
        metadata={col: [metadata[col][i] for i in rows] for col in METADATA_COLUMNS},
        cells_in=n,
        rejected={k: v for k, v in rejected.items() if v},
        dropped={k: v for k, v in dropped.items() if v},
    )
