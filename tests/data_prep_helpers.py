"""Helpers for the data_prep tests: read an MDS split back through streaming.StreamingDataset."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
from streaming import StreamingDataset


def read_split(split_dir: Path, **dataset_options) -> dict[str, dict]:
    """Every sample of a split folder, keyed by cell_id (StreamingDataset, no shuffling, local only)."""
    ds = StreamingDataset(local=str(split_dir), shuffle=False, batch_size=1, **dataset_options)
    try:
        samples = [ds[i] for i in range(len(ds))]
    finally:
        del ds
    out = {s["cell_id"]: s for s in samples}
    assert len(out) == len(samples), "cell ids must be unique"
    return out


def read_all(root: Path) -> dict[str, dict]:
    cells: dict[str, dict] = {}
    for split in ("train", "valid", "test"):
        if (root / split).is_dir():
            part = read_split(root / split)
            for sample in part.values():
                sample["_split"] = split
            assert not set(part) & set(cells), "a cell appears in two splits"
            cells.update(part)
    return cells


def same_cells(a: dict[str, dict], b: dict[str, dict]) -> bool:
    if a.keys() != b.keys():
        return False
    for key, x in a.items():
        y = b[key]
        if x.keys() != y.keys():
            return False
        for col, value in x.items():
            equal = np.array_equal(value, y[col]) if isinstance(value, np.ndarray) else value == y[col]
            if not equal:
                return False
    return True


def unique_name() -> str:
    return uuid.uuid4().hex[:8]
