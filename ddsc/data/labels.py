"""Condition-label vocabulary: metadata strings (cell line, drug, dose, ...) <-> integer ids.

Id 0 is reserved for the null / unknown label in every column. The model learns an embedding for it, which
is what classifier-free guidance samples from when a condition is dropped, and what an unseen or empty value
maps to at inference. Real labels are ``1..n`` in the sorted order of ``labels.json`` (written by data_prep
beside the MDS splits), so the ids are stable across processes and are saved with every checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

NULL_ID = 0


class LabelVocab:
    """``{column: [labels]}`` with label ``i`` (0-based in the list) encoded as id ``i + 1``."""

    def __init__(self, labels: Mapping[str, Iterable[str]]):
        self.labels: dict[str, list[str]] = {}
        for column, values in labels.items():
            values = [str(v) for v in values]
            if "" in values:
                raise ValueError(f"labels[{column!r}]: the empty string is the null label and cannot be listed")
            if len(set(values)) != len(values):
                raise ValueError(f"labels[{column!r}]: duplicate labels")
            self.labels[column] = values
        self._index = {col: {v: i + 1 for i, v in enumerate(vals)} for col, vals in self.labels.items()}

    @classmethod
    def from_json(cls, path: str | Path) -> LabelVocab:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"label vocabulary not found: {path}")
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise ValueError(f"{path}: expected a JSON object {{column: [labels]}}")
        return cls(data)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.labels, indent=1))

    def to_dict(self) -> dict[str, list[str]]:
        return {col: list(vals) for col, vals in self.labels.items()}

    def _column(self, column: str) -> dict[str, int]:
        if column not in self._index:
            raise KeyError(f"label column {column!r} not in the label vocabulary (has: {', '.join(self.labels)})")
        return self._index[column]

    def num_labels(self, column: str) -> int:
        """Number of real labels in ``column`` (the null label is not counted)."""
        return len(self._column(column))

    def encode(self, column: str, values: Sequence[str]) -> np.ndarray:
        """Label strings -> ids (int64); empty or unseen values map to the null id 0."""
        index = self._column(column)
        return np.fromiter((index.get(str(v), NULL_ID) for v in values), dtype=np.int64, count=len(values))

    def decode(self, column: str, ids: Sequence[int] | np.ndarray) -> list[str]:
        """Ids -> label strings; the null id decodes to ""."""
        names = ["", *self.labels[column]] if column in self.labels else self._column(column)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(names)):
            raise ValueError(f"label ids for {column!r} must be in [0, {len(names) - 1}]")
        return [names[i] for i in ids.tolist()]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelVocab) and self.labels == other.labels

    def __repr__(self) -> str:
        sizes = ", ".join(f"{col}: {len(vals)}" for col, vals in self.labels.items())
        return f"LabelVocab({sizes})"
