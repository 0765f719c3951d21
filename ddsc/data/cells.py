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
path first proves that no rule applies with about six passes over the flat arrays (the per-reason
bookkeeping makes about twenty-five); any doubt falls through to that bookkeeping, which decides per cell.

A reader whose rows start with a marker entry (Tahoe's ``<cls>``) checks the marker itself and passes
``lead=1``: the fast path then keeps the marker entries in the flat arrays and skips them through the cell
bounds (stripping them would copy the whole batch); the per-cell path strips them first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ddsc.data.schema import COUNT_DTYPES, METADATA_COLUMNS

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
    offsets: np.ndarray  # int64 [n + 1]: cell i is genes[offsets[i] + lead:offsets[i + 1]]
    genes: np.ndarray  # int32, flat gene token ids
    counts: np.ndarray  # flat raw counts (> 0; 0 at the lead entries), the first of COUNT_DTYPES holding them
    metadata: dict[str, list[str]]  # every schema.METADATA_COLUMNS, one string per kept cell
    cells_in: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    lead: int = 0  # entries before each cell's genes that are not genes (a reader's marker, left in place)

    def __len__(self) -> int:
        return len(self.cell_ids)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per cell, the start and end of its genes and counts in the flat arrays."""
        return self.offsets[:-1] + self.lead, self.offsets[1:]


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
    genes: np.ndarray, values: np.ndarray, offsets: np.ndarray, known: np.ndarray, codes: np.ndarray, lead: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """(int32 genes, counts) when every cell passes every rule as it is, else None.

    Clean means: no reader rejection, no empty cell, every gene id known, gene ids strictly increasing
    within each cell (so no duplicate; unsorted cells take the slow path), every count an integer in
    1..2**31 - 1. The counts come back in the first of ``COUNT_DTYPES`` that holds them (see
    :func:`_exact_counts`). The ``lead`` entries of each row are not checked.
    """
    if not len(genes) or codes.any() or np.diff(offsets).min() <= lead:
        return None
    starts, ends = offsets[:-1] + lead, offsets[1:]
    increasing = genes[1:] > genes[:-1]
    for j in range(lead + 1):  # pairs that end at or before a cell's first gene are not within the cell
        excused = starts - 1 - j
        increasing[excused[excused >= 0]] = True
    if not increasing.all():
        return None
    # Increasing cells span [first gene, last gene], so the known-gene check needs no pass over the entries
    # when the ids in that span are all known (a vocab without holes); otherwise look every id up.
    low, high = int(genes[starts].min()), int(genes[ends - 1].max())
    if low < 0 or high >= len(known):
        return None
    if not known[low : high + 1].all():
        is_known = known.take(genes, mode="clip")  # clip: lead entries may be out of range, genes are not
        is_known[_lead_entries(offsets, lead)] = True
        if not is_known.all():
            return None
    at_lead = _lead_entries(offsets, lead)
    counts = _exact_counts(values, at_lead)
    if counts is None:
        return None
    counts[at_lead] = 1
    if counts.min() <= 0:
        return None
    counts[at_lead] = 0
    return genes.astype(np.int32, copy=False), counts  # genes in range: checked above


def _exact_counts(values: np.ndarray, excused: np.ndarray) -> np.ndarray | None:
    """``values`` cast to the first of ``COUNT_DTYPES`` that holds each of them exactly (a copy), else None.

    Float values are cast and compared with the original: a NaN, infinite, fractional or out-of-range value
    does not survive the round trip unchanged. The comparison runs in the values' own float type, not in
    numpy's promotion of the pair (float64 for int32 x float32: slower), and is exact, since an integral
    value the integer type holds survives both casts. Float positions ``excused`` (lead entries) may differ.
    """
    for dtype in COUNT_DTYPES:
        if values.dtype.kind == "f":
            with np.errstate(invalid="ignore"):
                counts = values.astype(dtype)
            same = np.equal(counts.astype(values.dtype), values)
            same[excused] = True
            if same.all():
                return counts
        elif values.dtype.kind in "iu":  # lead entries included: a marker out of range only widens the type
            info = np.iinfo(dtype)
            if info.min <= values.min() and values.max() <= info.max:
                return values.astype(dtype)
    return None


def _narrowest(counts: np.ndarray) -> np.ndarray:
    """Validated counts (integral, 1..2**31 - 1) in the first of ``COUNT_DTYPES`` that holds them."""
    largest = counts.max(initial=0)
    return counts.astype(next(t for t in COUNT_DTYPES if largest <= np.iinfo(t).max))


def _lead_entries(offsets: np.ndarray, lead: int) -> np.ndarray:
    """Flat positions of the first ``lead`` entries of every row (rows hold more than ``lead``)."""
    return (offsets[:-1, None] + np.arange(lead)).ravel()


def _strip_lead(
    genes: np.ndarray, values: np.ndarray, offsets: np.ndarray, lead: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop the first ``lead`` entries of every row (all of a shorter row's)."""
    lengths = np.diff(offsets)
    body = np.ones(len(genes), dtype=bool)
    for j in range(lead):
        body[offsets[:-1][lengths > j] + j] = False
    stripped = np.zeros_like(offsets)
    np.cumsum(lengths - np.minimum(lengths, lead), out=stripped[1:])
    return genes[body], values[body], stripped


def validate(
    genes: np.ndarray,
    values: np.ndarray,
    offsets: np.ndarray,
    known: np.ndarray,
    codes: np.ndarray,
    cell_ids: list[str],
    metadata: dict[str, list[str]],
    lead: int = 0,
) -> CellBatch:
    """Check ragged cells and return the clean ones. ``known[g]`` is True for valid gene token ids.

    ``codes`` carries rejections already decided by the reader (e.g. a missing Tahoe marker); entries of
    such cells are ignored. ``metadata`` values are per input row and are filtered with the cells.
    ``offsets`` start at 0; the first ``lead`` entries of every row are a marker the reader has checked
    (a row without one must be rejected in ``codes``) and are not part of the cell.
    """
    n = len(offsets) - 1
    genes = np.asarray(genes)
    values = np.asarray(values)
    offsets = np.asarray(offsets, dtype=np.int64)
    clean = _clean(genes, values, offsets, known, codes, lead)
    if clean is not None:
        return CellBatch(
            cell_ids=list(cell_ids),
            offsets=offsets,
            genes=clean[0],
            counts=clean[1],
            metadata={col: list(metadata[col]) for col in METADATA_COLUMNS},
            cells_in=n,
            lead=lead,
        )
    if lead:
        genes, values, offsets = _strip_lead(genes, values, offsets, lead)
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
        counts=_narrowest(safe if all_kept else safe[keep]),
        metadata={col: [metadata[col][i] for i in rows] for col in METADATA_COLUMNS},
        cells_in=n,
        rejected={k: v for k, v in rejected.items() if v},
        dropped={k: v for k, v in dropped.items() if v},
    )
