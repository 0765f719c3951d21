"""Tahoe row validation: marker handling, every rejection / drop rule with its counter, malformed files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ddsc.data.mds_convert import ConversionError, WriteOptions
from ddsc.data.splits import SplitSpec
from ddsc.data.tahoe import TahoeFormatError, TahoeSource, convert_tahoe, parse_drugname_drugconc
from ddsc.data.tahoe_writer import write_tahoe_shard

NAN = float("nan")
# (genes, expressions) per row, and what validation must make of it: kept (genes, counts) or a reason.
ROWS = [
    ([1, 5, 7], [-2, 3, 1], ([5, 7], [3, 1])),
    ([1, 5, 6], [-2, 70000, 65535], ([5, 6], [70000, 65535])),  # a count above uint16: its batch is int32
    ([5, 7], [3, 1], "bad_marker"),  # no marker
    ([1, 5, 7], [4, 3, 1], "bad_marker"),  # gene 1 but not the -2 value
    ([1, 5], [-2, NAN], "nan_count"),
    ([1, 5, 6], [-2, 2, -1], "negative_count"),
    ([1, 5], [-2, 1.5], "non_integer_count"),
    ([1, 5, 8, 5], [-2, 1, 1, 2], "duplicate_gene"),
    ([1], [-2], "empty_cell"),
    ([1, 5, 99999, 8], [-2, 2, 4, 1], ([5, 8], [2, 1])),  # unknown gene dropped
    ([1, 5, 6], [-2, 0, 3], ([6], [3])),  # zero count dropped
    ([1, 5, 6], [-2, 1], "length_mismatch"),
    ([1, 99999], [-2, 3], "empty_cell"),  # only an unknown gene
    ([1, 5], [-2, 3e9], "count_overflow"),
    ([1, 5], [-2, float(2**31)], "count_overflow"),  # float32 rounds 2**31 - 1 up to this very value
    ([1, 1, 2, 9], [-2, 5, 5, 2], ([9], [2])),  # special ids inside the body are not genes
    ([1, 9, 5, 7], [-2, 1, 2, 3], ([9, 5, 7], [1, 2, 3])),  # unsorted is fine; order kept
    (None, [-2, 1], "null_row"),
]
KNOWN = np.zeros(20, dtype=bool)
KNOWN[3:20] = True
META = {
    "drug": "DMSO_TF",
    "sample": "smp_1",
    "BARCODE_SUB_LIB_ID": "bc",
    "cell_line_id": "CVCL_0023",
    "moa-fine": "vehicle",
    "canonical_smiles": "CS(C)=O",
    "pubchem_cid": "679.0",
    "plate": "plate1",
}


def _write(path, rows):
    n = len(rows)
    table = pa.table(
        {
            "genes": pa.array([r[0] for r in rows], type=pa.list_(pa.int64())),
            "expressions": pa.array([r[1] for r in rows], type=pa.list_(pa.float32())),
            **{k: [v] * n for k, v in META.items()},
        }
    )
    pq.write_table(table, path, row_group_size=4)


def test_every_rule_decides_and_counts(tmp_path):
    path = str(tmp_path / "shard.parquet")
    _write(path, ROWS)
    source = TahoeSource(KNOWN, {"smp_1": ("0", "uM")}, batch_size=5)  # batches cross row groups
    batches = list(source.batches(path))
    kept = {
        cid: (b.genes[start:end].tolist(), b.counts[start:end].tolist())
        for b in batches
        for cid, start, end in zip(b.cell_ids, *b.bounds(), strict=True)
    }
    expected_kept = {
        f"shard:{i}": (list(r[2][0]), list(r[2][1])) for i, r in enumerate(ROWS) if isinstance(r[2], tuple)
    }
    assert kept == expected_kept
    rejected: dict[str, int] = {}
    dropped: dict[str, int] = {}
    for b in batches:
        for k, v in b.rejected.items():
            rejected[k] = rejected.get(k, 0) + v
        for k, v in b.dropped.items():
            dropped[k] = dropped.get(k, 0) + v
    reasons = [r[2] for r in ROWS if isinstance(r[2], str)]
    assert rejected == {reason: reasons.count(reason) for reason in set(reasons)}
    # unknown: 99999 twice, ids 1 and 2 inside a body; zero: one entry
    assert dropped == {"unknown_gene": 4, "zero_count": 1}
    assert all(b.genes.dtype == np.int32 for b in batches)
    assert [b.counts.dtype for b in batches] == [np.int32] + [np.uint16] * (len(batches) - 1)  # see ROWS[1]
    first = next(b for b in batches if len(b))
    assert first.metadata["dose"][0] == "0" and first.metadata["barcode"][0] == "bc"
    assert first.metadata["source"][0] == "shard.parquet"


def test_summary_accounts_for_every_cell(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write(data / "train-00000-of-00001.parquet", ROWS)
    pq.write_table(
        pa.table(
            {
                "gene_symbol": [f"G{i}" for i in range(3, 20)],
                "ensembl_id": [f"E{i}" for i in range(3, 20)],
                "token_id": list(range(3, 20)),
            }
        ),
        tmp_path / "genes.parquet",
    )
    summary = convert_tahoe(
        str(data),
        str(tmp_path / "genes.parquet"),
        str(tmp_path / "out"),
        options=WriteOptions(split=SplitSpec(valid_fraction=0.0)),
    )
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk == summary
    assert summary["cells_in"] == len(ROWS)
    assert summary["cells_out"] == sum(isinstance(r[2], tuple) for r in ROWS)
    assert summary["cells_out"] + sum(summary["cells_rejected"].values()) == summary["cells_in"]
    assert summary["cells_with_empty_metadata"] == {"dose": summary["cells_out"], "dose_unit": summary["cells_out"]}
    lengths = sorted(len(r[2][0]) for r in ROWS if isinstance(r[2], tuple))
    assert summary["genes_per_cell"]["p0"] == lengths[0] and summary["genes_per_cell"]["p100"] == lengths[-1]
    assert summary["genes_per_cell"]["p50"] == lengths[(len(lengths) - 1) // 2]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.drop_columns(["plate"]), r"missing column\(s\) \['plate'\]"),
        (
            lambda t: t.set_column(0, "genes", pa.array([["a"]] * len(t), type=pa.list_(pa.string()))),
            "'genes' has type",
        ),
        (lambda t: t.set_column(1, "expressions", pa.array([1.0] * len(t))), "'expressions' has type"),
    ],
)
def test_malformed_columns_name_the_file_and_column(tmp_path, change, message):
    path = tmp_path / "shard.parquet"
    _write(path, ROWS[:2])
    pq.write_table(change(pq.read_table(path)), path)
    with pytest.raises(TahoeFormatError, match=message) as err:
        list(TahoeSource(KNOWN, {}).batches(str(path)))
    assert str(path) in str(err.value)


def test_a_bad_file_fails_the_run_without_a_complete_looking_output(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    offsets, genes, values = [0, 3], [1, 5, 6], [-2, 1, 1]
    write_tahoe_shard(data / "a.parquet", offsets, genes, values, {k: [v] for k, v in META.items()})
    (data / "b.parquet").write_bytes(b"not parquet at all")
    pq.write_table(pa.table({"gene_symbol": ["G"], "ensembl_id": ["E"], "token_id": [5]}), tmp_path / "genes.parquet")
    with pytest.raises(ConversionError, match="b.parquet"):
        convert_tahoe(str(data), str(tmp_path / "genes.parquet"), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "summary.json").exists()
    assert not (tmp_path / "out" / "train" / "index.json").exists()
    # The script ends the same way with one line naming the file (after the progress bar), not a traceback.
    script = Path(__file__).resolve().parents[1] / "data_prep" / "tahoe_to_mds.py"
    args = ["--input", str(data), "--gene-metadata", str(tmp_path / "genes.parquet"), "--out", str(tmp_path / "cli")]
    run = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert last.startswith(f"error: {data / 'b.parquet'}: ") and "not a parquet file" in last


def test_parse_drugname_drugconc():
    assert parse_drugname_drugconc("[('DMSO_TF', 0.0, 'uM')]") == ("DMSO_TF", "0", "uM")
    assert parse_drugname_drugconc("[('Drug A', 0.05, 'uM')]") == ("Drug A", "0.05", "uM")
    assert parse_drugname_drugconc("[('A', 5.0, 'uM'), ('B', 1, 'nM')]") == ("A+B", "5+1", "uM+nM")
    with pytest.raises(TahoeFormatError, match="cannot parse"):
        parse_drugname_drugconc("DMSO 0.1uM")
