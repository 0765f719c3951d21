"""Writing the Tahoe-100M parquet layout (``ddsc.data.tahoe`` reads it): the demo data, test fixtures and the
throughput benchmark's shards all write it through here, so they share one definition of the column types and
of the ``<cls>`` marker each cell starts with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ddsc.data.tahoe import MARKER_EXPRESSION
from ddsc.data.tokens import FIRST_GENE_ID, GENE_CLS


def write_tahoe_shard(
    path: str | Path,
    offsets: np.ndarray,
    genes: np.ndarray,
    expressions: np.ndarray,
    columns: dict[str, list[str]],
    row_group_size: int = 1000,
) -> None:
    """Write one Tahoe-layout shard from ragged arrays (markers included by the caller) and string columns."""
    pq.write_table(tahoe_table(offsets, genes, expressions, columns), path, row_group_size=row_group_size)


def tahoe_table(
    offsets: np.ndarray, genes: np.ndarray, expressions: np.ndarray, columns: dict[str, list[str]]
) -> pa.Table:
    """Ragged arrays (markers included) + string columns -> a table with Tahoe-100M's column types."""
    offsets = pa.array(np.asarray(offsets, dtype=np.int32))
    return pa.table(
        {
            "genes": pa.ListArray.from_arrays(offsets, pa.array(np.asarray(genes, dtype=np.int64))),
            "expressions": pa.ListArray.from_arrays(offsets, pa.array(np.asarray(expressions, dtype=np.float32))),
            **{name: pa.array(values, type=pa.string()) for name, values in columns.items()},
        }
    )


def with_markers(counts: np.ndarray, token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense [cells, genes] counts -> ragged (offsets, genes, expressions) of non-zero genes after the marker."""
    rows, cols = np.nonzero(counts)
    per_cell = np.bincount(rows, minlength=len(counts)) + 1
    offsets = np.concatenate([[0], np.cumsum(per_cell)])
    genes = np.empty(offsets[-1], dtype=np.int64)
    values = np.empty(offsets[-1], dtype=np.float32)
    genes[offsets[:-1]], values[offsets[:-1]] = GENE_CLS, MARKER_EXPRESSION
    body = np.ones(offsets[-1], dtype=bool)
    body[offsets[:-1]] = False
    genes[body], values[body] = token_ids[cols], counts[rows, cols]
    return offsets, genes, values


def synthetic_shard(
    path: str | Path,
    cells: int,
    genes_per_cell: int = 2000,
    n_genes: int = 20000,
    seed: int = 0,
    row_group_size: int = 1000,
) -> None:
    """A Tahoe-layout shard of realistic size for throughput benchmarks: no biology, just the right shape
    (about ``genes_per_cell`` non-zero genes of ``n_genes``, small integer counts), written in row groups."""
    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, cells, row_group_size):
        n = min(row_group_size, cells - start)
        present = rng.random((n, n_genes), dtype=np.float32) < genes_per_cell / n_genes
        counts = np.where(present, rng.geometric(0.5, (n, n_genes)), 0)
        offsets, genes, values = with_markers(counts, np.arange(FIRST_GENE_ID, FIRST_GENE_ID + n_genes))
        columns = {
            name: [f"{name}_{i % 7}" for i in range(start, start + n)]
            for name in ("drug", "sample", "cell_line_id", "moa-fine", "canonical_smiles", "pubchem_cid", "plate")
        }
        columns["BARCODE_SUB_LIB_ID"] = [f"bc{i}" for i in range(start, start + n)]
        table = tahoe_table(offsets, genes, values, columns)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
