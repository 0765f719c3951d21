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
INT32_MAX = np.iinfo(np.int32).max


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
    lengths = np.diff(offsets)
    genes = np.asarray(genes, dtype=np.int64)
    row_cache: list[np.ndarray] = []

    def row_of() -> np.ndarray:  # entry -> cell index; built only when a slow path needs it
        if not row_cache:
            row_cache.append(np.repeat(np.arange(n, dtype=np.int64), lengths))
        return row_cache[0]

    values = np.asarray(values)

    # Count checks: one combined pass decides whether any cell needs the per-reason bookkeeping.
    finite = np.isfinite(values)
    all_finite = bool(finite.all())
    safe = values if all_finite else np.where(finite, values, 0)
    fractional = safe != np.floor(safe) if values.dtype.kind == "f" else np.zeros(len(safe), dtype=bool)
    if not all_finite or np.any((safe < 0) | (safe > INT32_MAX) | fractional):
        mark(codes, _rows_with(~finite, row_of(), n), "nan_count")
        mark(codes, _rows_with(safe < 0, row_of(), n), "negative_count")
        mark(codes, _rows_with(fractional, row_of(), n), "non_integer_count")
        mark(codes, _rows_with(safe > INT32_MAX, row_of(), n), "count_overflow")

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
