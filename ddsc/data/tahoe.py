"""Reading Tahoe-100M expression shards (parquet) into validated cell batches.

The Tahoe-100M input contract: ``genes`` list<int64> token ids and ``expressions`` list<float32> raw UMI
counts of the cell's non-zero genes, each row led by a ``<cls>`` marker (``genes[0] == 1``,
``expressions[0] == -2``) that is verified and stripped here; string metadata per cell; the dose is not in
the shards but in ``sample_metadata.parquet`` (``drugname_drugconc``, a Python literal per ``sample``).

Files are streamed in record batches of ``batch_size`` rows so a worker holds one batch (plus one parquet
row group in pyarrow's reader) however large the file is.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ddsc.data.cells import CellBatch, mark, reject_codes, validate
from ddsc.data.mds_convert import WriteOptions, convert, fingerprint
from ddsc.data.remote import expand_inputs, open_input
from ddsc.data.schema import METADATA_COLUMNS
from ddsc.data.tokens import GENE_CLS
from ddsc.data.vocab import GeneVocab

MARKER_EXPRESSION = -2.0
LIST_COLUMNS = ("genes", "expressions")
# schema metadata column -> Tahoe column (dose / dose_unit come from sample_metadata, source from the file).
TAHOE_METADATA: dict[str, str] = {
    "drug": "drug",
    "cell_line_id": "cell_line_id",
    "plate": "plate",
    "sample": "sample",
    "moa_fine": "moa-fine",
    "canonical_smiles": "canonical_smiles",
    "pubchem_cid": "pubchem_cid",
    "barcode": "BARCODE_SUB_LIB_ID",
}
REQUIRED_COLUMNS = (*LIST_COLUMNS, *TAHOE_METADATA.values())


class TahoeFormatError(ValueError):
    """A file that does not follow the Tahoe-100M layout (the whole file is refused, never half-read)."""


def format_dose(value: float) -> str:
    """Concentrations as compact, stable strings: 0.0 -> "0", 0.05 -> "0.05", 5.0 -> "5"."""
    return format(float(value), "g")


def parse_drugname_drugconc(text: str) -> tuple[str, str, str]:
    """``"[('Drug', 0.5, 'uM')]"`` -> ``("Drug", "0.5", "uM")``; combinations are joined with ``+``."""
    try:
        entries = ast.literal_eval(text)
        if isinstance(entries, tuple):
            entries = [entries]
        drugs, doses, units = zip(*[(str(d), format_dose(c), str(u)) for d, c, u in entries], strict=True)
    except (ValueError, SyntaxError, TypeError) as err:
        raise TahoeFormatError(f"cannot parse drugname_drugconc {text!r}: expected [('drug', conc, 'unit')]") from err
    return "+".join(drugs), "+".join(doses), "+".join(units)


def read_sample_doses(path: str) -> dict[str, tuple[str, str]]:
    """``sample_metadata.parquet`` -> ``{sample: (dose, unit)}``; a sample listed twice must agree."""
    with open_input(path) as f:
        table = pq.read_table(f, columns=None)
    missing = {"sample", "drugname_drugconc"} - set(table.column_names)
    if missing:
        raise TahoeFormatError(f"{path}: sample metadata lacks column(s) {sorted(missing)}")
    doses: dict[str, tuple[str, str]] = {}
    samples = table.column("sample").to_pylist()
    for row, (sample, text) in enumerate(zip(samples, table.column("drugname_drugconc").to_pylist(), strict=True)):
        try:
            _, dose, unit = parse_drugname_drugconc(text)
        except TahoeFormatError as err:
            raise TahoeFormatError(f"{path}: row {row} (sample {sample!r}): {err}") from None
        if doses.setdefault(sample, (dose, unit)) != (dose, unit):
            raise TahoeFormatError(f"{path}: sample {sample!r} listed with different doses")
    return doses


def check_schema(path: str, schema: pa.Schema) -> None:
    """Refuse a file with missing or mistyped columns before reading any row of it."""
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise TahoeFormatError(f"{path}: missing column(s) {missing} (has {schema.names})")
    for name, kind in (("genes", pa.types.is_integer), ("expressions", _is_number)):
        typ = schema.field(name).type
        if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)) or not kind(typ.value_type):
            raise TahoeFormatError(f"{path}: column {name!r} has type {typ}, expected a list of numbers")
    for name in TAHOE_METADATA.values():
        typ = schema.field(name).type
        if pa.types.is_nested(typ) or pa.types.is_binary(typ):
            raise TahoeFormatError(f"{path}: column {name!r} has type {typ}, expected a string")


def _is_number(typ: pa.DataType) -> bool:
    return pa.types.is_floating(typ) or pa.types.is_integer(typ)


def _flat(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list array -> (values, zero-based offsets); null lists have length 0 (arrow guarantees it)."""
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    return values, offsets - offsets[0]


def _align(values: np.ndarray, offsets: np.ndarray, value_offsets: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Rows whose genes and expressions differ in length are rejected; lay values out like the genes."""
    lengths = np.diff(offsets)
    same = lengths == np.diff(value_offsets)
    mark(codes, ~same, "length_mismatch")
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    take = same[row_of]
    position = np.arange(len(row_of)) - offsets[row_of] + value_offsets[row_of]
    aligned = np.zeros(len(row_of), dtype=values.dtype)
    aligned[take] = values[position[take]]
    return aligned


def _strings(column: pa.Array) -> list[str]:
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        column = pc.cast(column, pa.string())
    return [v or "" for v in column.to_pylist()]


@dataclass
class TahoeSource:
    """Everything a worker needs to read a shard: picklable, so it crosses process boundaries as is."""

    known_genes: np.ndarray  # bool table over token ids (GeneVocab.known_mask())
    sample_doses: dict[str, tuple[str, str]]
    batch_size: int = 1024

    suffix = ".parquet"

    def count_cells(self, path: str) -> int:
        with open_input(path) as f:
            return pq.ParquetFile(f).metadata.num_rows

    def batches(self, path: str) -> Iterator[CellBatch]:
        source = os.path.basename(path)
        stem = source.removesuffix(self.suffix)
        with open_input(path) as f:
            try:
                # No pre-buffering and a buffered stream: pyarrow then holds one row group's pages, not
                # ranges that accumulate over the file (measured: peak RSS flat from 1x to 10x input).
                parquet = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 22)
            except (pa.ArrowInvalid, OSError) as err:
                raise TahoeFormatError(f"{path}: not a readable parquet file ({err})") from None
            check_schema(path, parquet.schema_arrow)
            row = 0
            for batch in parquet.iter_batches(batch_size=self.batch_size, columns=list(REQUIRED_COLUMNS)):
                yield self._convert(batch, stem, source, row)
                row += batch.num_rows

    def _convert(self, batch: pa.RecordBatch, stem: str, source: str, first_row: int) -> CellBatch:
        n = batch.num_rows
        genes_col, expr_col = batch.column("genes"), batch.column("expressions")
        genes, offsets = _flat(genes_col)
        values, expr_offsets = _flat(expr_col)
        codes = reject_codes(n)
        mark(codes, np.asarray(genes_col.is_null()) | np.asarray(expr_col.is_null()), "null_row")
        lengths = np.diff(offsets)
        if not np.array_equal(offsets, expr_offsets):
            values = _align(values, offsets, expr_offsets, codes)
        nonempty = lengths > 0
        first = offsets[:-1][nonempty]
        has_marker = np.zeros(n, dtype=bool)
        has_marker[nonempty] = (genes[first] == GENE_CLS) & (values[first] == MARKER_EXPRESSION)
        mark(codes, ~has_marker, "bad_marker")
        metadata = {col: _strings(batch.column(tahoe)) for col, tahoe in TAHOE_METADATA.items()}
        doses = [self.sample_doses.get(s, ("", "")) for s in metadata["sample"]]
        metadata["dose"] = [d for d, _ in doses]
        metadata["dose_unit"] = [u for _, u in doses]
        metadata["source"] = [source] * n
        cell_ids = [f"{stem}:{first_row + i}" for i in range(n)]
        assert set(metadata) == set(METADATA_COLUMNS)
        # The marker is the lead entry of every row: validate skips it (rows without one are rejected).
        return validate(genes, values, offsets, self.known_genes, codes, cell_ids, metadata, lead=1)


def convert_tahoe(
    inputs: str,
    gene_metadata: str,
    out: str,
    sample_metadata: str | None = None,
    options: WriteOptions | None = None,
    batch_size: int = 1024,
) -> dict:
    """Tahoe-100M shards (a directory, glob or URL) -> MDS splits under ``out``; returns the summary."""
    vocab = GeneVocab.from_gene_metadata(gene_metadata)
    doses = read_sample_doses(sample_metadata) if sample_metadata else {}
    source = TahoeSource(vocab.known_mask(), doses, batch_size)
    files = expand_inputs(inputs, TahoeSource.suffix)
    files = [f for f in files if os.path.basename(f) not in ("gene_metadata.parquet", "sample_metadata.parquet")]
    key = fingerprint(source.known_genes, sorted(doses.items()))  # batch size does not change the output
    return convert(files, source, key, vocab, out, options or WriteOptions())
