"""Deterministic train / valid / test assignment from a hash, never from a random draw or the input order.

A cell's split depends only on (seed, group key): the cell id, or its ``sample`` (well) or ``plate`` when
grouping, so a re-run, a resumed run, or a run with a different number of workers assigns every cell to the
same split, and grouped splits never put one well (or plate) on both sides. With few groups (Tahoe has 14
plates) the realised fractions are coarse; the summary reports them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ddsc.data.cells import CellBatch

SPLITS: tuple[str, ...] = ("train", "valid", "test")
SPLIT_BY: tuple[str, ...] = ("cell", "sample", "plate")


@dataclass(frozen=True)
class SplitSpec:
    valid_fraction: float = 0.01
    test_fraction: float = 0.0
    by: str = "cell"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.by not in SPLIT_BY:
            raise ValueError(f"split by {self.by!r}: expected one of {SPLIT_BY}")
        if not (self.valid_fraction >= 0 and self.test_fraction >= 0 and self.valid_fraction + self.test_fraction < 1):
            raise ValueError("valid and test fractions must be >= 0 and sum to less than 1")


def unit_hash(seed: int, key: str) -> float:
    """A stable uniform number in [0, 1) for ``key`` (blake2b: same on every machine and Python version)."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def assign_splits(batch: CellBatch, spec: SplitSpec) -> np.ndarray:
    """Index into SPLITS (int8) for every cell of the batch."""
    keys = batch.cell_ids if spec.by == "cell" else batch.metadata[spec.by]
    if spec.by != "cell" and "" in keys:
        i = keys.index("")
        raise ValueError(f"cell {batch.cell_ids[i]}: split by {spec.by} but the cell has no {spec.by}")
    hashes = {k: unit_hash(spec.seed, k) for k in dict.fromkeys(keys)}  # one hash per distinct key
    u = np.fromiter((hashes[k] for k in keys), dtype=np.float64, count=len(keys))
    out = np.zeros(len(keys), dtype=np.int8)
    out[u < spec.valid_fraction + spec.test_fraction] = 2
    out[u < spec.valid_fraction] = 1
    return out
