"""What a conversion did, per input file and in total: the numbers behind "nothing kept or lost silently".

Each input's statistics are saved as its done-marker (plain JSON), so a resumed run rebuilds the same final
summary without re-reading finished inputs. Genes-per-cell percentiles come from an exact histogram
(merged by addition), not from an approximate sketch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from ddsc.data.cells import CellBatch
from ddsc.data.schema import LABEL_COLUMNS, METADATA_COLUMNS
from ddsc.data.splits import SPLITS

PERCENTILES = (0, 1, 5, 25, 50, 75, 95, 99, 100)


@dataclass
class PartStats:
    """Statistics of one input file (JSON round-trips through ``asdict`` / ``PartStats(**d)``)."""

    input: str
    cells_in: int = 0
    cells_out: dict[str, int] = field(default_factory=dict)  # split -> cells
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> cells
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> gene entries
    empty_metadata: dict[str, int] = field(default_factory=dict)  # column -> kept cells with ""
    genes_per_cell: dict[str, int] = field(default_factory=dict)  # str(length) -> cells (JSON keys are str)
    total_counts: int = 0
    bytes_written: int = 0
    labels: dict[str, list[str]] = field(default_factory=dict)  # LABEL_COLUMNS -> sorted unique non-empty

    def add(self, batch: CellBatch, split: np.ndarray) -> None:
        self.cells_in += batch.cells_in
        _add(self.rejected, batch.rejected)
        _add(self.dropped, batch.dropped)
        _add(self.cells_out, {SPLITS[i]: int(n) for i, n in enumerate(np.bincount(split, minlength=len(SPLITS))) if n})
        _add(self.empty_metadata, {c: v.count("") for c in METADATA_COLUMNS if (v := batch.metadata[c]).count("")})
        starts, ends = batch.bounds()
        lengths, counts = np.unique(ends - starts, return_counts=True)
        _add(self.genes_per_cell, {str(k): int(v) for k, v in zip(lengths.tolist(), counts.tolist(), strict=True)})
        self.total_counts += int(batch.counts.sum(dtype=np.int64))  # 0 at lead entries
        for col in LABEL_COLUMNS:
            self.labels[col] = sorted(set(self.labels.get(col, ())) | set(batch.metadata[col]) - {""})

    def to_dict(self) -> dict:
        return asdict(self)


def _add(total: dict[str, int], part: dict[str, int]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0) + int(value)


def merge_labels(parts: list[PartStats]) -> dict[str, list[str]]:
    return {col: sorted(set().union(*(p.labels.get(col, ()) for p in parts))) for col in LABEL_COLUMNS}


def summarize(parts: list[PartStats], seconds: float, **extra: object) -> dict:
    """The final ``summary.json``: totals over inputs, rejection reasons, genes-per-cell percentiles."""
    total = PartStats(input="")
    for p in parts:
        total.cells_in += p.cells_in
        total.total_counts += p.total_counts
        total.bytes_written += p.bytes_written
        for name in ("cells_out", "rejected", "dropped", "empty_metadata", "genes_per_cell"):
            _add(getattr(total, name), getattr(p, name))
    hist = Counter({int(k): v for k, v in total.genes_per_cell.items()})
    cells_out = sum(total.cells_out.values())
    if cells_out + sum(total.rejected.values()) != total.cells_in:
        raise AssertionError("conversion bookkeeping: cells in != cells out + cells rejected")
    return {
        "inputs": len(parts),
        "cells_in": total.cells_in,
        "cells_out": cells_out,
        "cells_per_split": {s: total.cells_out.get(s, 0) for s in SPLITS if s in total.cells_out},
        "cells_rejected": dict(sorted(total.rejected.items())),
        "gene_entries_dropped": dict(sorted(total.dropped.items())),
        "cells_with_empty_metadata": dict(sorted(total.empty_metadata.items())),
        "genes_per_cell": _percentiles(hist),
        "counts_per_cell_mean": total.total_counts / cells_out if cells_out else 0.0,
        "bytes_written": total.bytes_written,
        "seconds": round(seconds, 2),
        **extra,
    }


def _percentiles(hist: Counter) -> dict[str, float]:
    if not hist:
        return {}
    lengths = np.array(sorted(hist), dtype=np.float64)
    weights = np.array([hist[int(k)] for k in lengths], dtype=np.int64)
    cum = np.cumsum(weights)
    out = {f"p{q}": float(lengths[np.searchsorted(cum, max(q / 100 * cum[-1], 1))]) for q in PERCENTILES}
    out["mean"] = float((lengths * weights).sum() / cum[-1])
    return out


def format_summary(summary: dict) -> str:
    """A few lines for the terminal; the full detail is in summary.json."""
    g = summary["genes_per_cell"]
    lines = [
        f"cells in {summary['cells_in']:,} -> out {summary['cells_out']:,} "
        f"({', '.join(f'{k} {v:,}' for k, v in summary['cells_per_split'].items())})",
        f"rejected: {summary['cells_rejected'] or 'none'}; gene entries dropped: {summary['gene_entries_dropped'] or 'none'}",
    ]
    if g:
        lines.append(f"genes/cell p5 {g['p5']:.0f}  median {g['p50']:.0f}  p95 {g['p95']:.0f}  max {g['p100']:.0f}")
    lines.append(f"{summary['bytes_written'] / 1e6:,.1f} MB written in {summary['seconds']:.1f} s")
    return "\n".join(lines)
