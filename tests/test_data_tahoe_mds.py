"""Tahoe parquet -> MDS end to end: read back through StreamingDataset equals the input; splits; resume."""

from __future__ import annotations

import ast
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from data_prep_helpers import read_all, same_cells

from ddsc.data.demo_data import DemoSpec, make_demo_data
from ddsc.data.mds_convert import ConversionError, WriteOptions, read_ahead
from ddsc.data.schema import LABEL_COLUMNS
from ddsc.data.splits import SplitSpec
from ddsc.data.tahoe import convert_tahoe

REPO = Path(__file__).resolve().parents[1]
SPEC = DemoSpec(cells=900, genes=300, shards=3, row_group_size=128, mean_library=400.0, seed=3)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root, SPEC)
    return root


def _convert(demo: Path, out: Path, **split) -> dict:
    options = WriteOptions(split=SplitSpec(**{"valid_fraction": 0.2, **split}), shard_size=1 << 16)
    return convert_tahoe(
        str(demo / "data"),
        str(demo / "gene_metadata.parquet"),
        str(out),
        str(demo / "sample_metadata.parquet"),
        options,
        batch_size=100,
    )


def _reference(demo: Path) -> dict[str, dict]:
    """The input read row by row with plain pyarrow + ast (independent of the converter's vectorised path)."""
    doses = {}
    for row in pq.read_table(demo / "sample_metadata.parquet").to_pylist():
        ((drug, conc, unit),) = ast.literal_eval(row["drugname_drugconc"])
        doses[row["sample"]] = (format(conc, "g"), unit)
    cells = {}
    for path in sorted((demo / "data").glob("*.parquet")):
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            assert row["genes"][0] == 1 and row["expressions"][0] == -2
            cells[f"{path.stem}:{i}"] = {
                "genes": np.array(row["genes"][1:], dtype=np.int32),
                "counts": np.array(row["expressions"][1:], dtype=np.int32),
                "drug": row["drug"],
                "cell_line_id": row["cell_line_id"],
                "plate": row["plate"],
                "sample": row["sample"],
                "barcode": row["BARCODE_SUB_LIB_ID"],
                "moa_fine": row["moa-fine"],
                "pubchem_cid": row["pubchem_cid"],
                "canonical_smiles": row["canonical_smiles"],
                "dose": doses[row["sample"]][0],
                "dose_unit": doses[row["sample"]][1],
                "source": path.name,
            }
    return cells


def test_read_back_equals_input(demo, tmp_path):
    summary = _convert(demo, tmp_path / "mds")
    cells = read_all(tmp_path / "mds")
    reference = _reference(demo)
    assert cells.keys() == reference.keys()
    for cell_id, expected in reference.items():
        got = cells[cell_id]
        assert got["genes"].dtype == np.int32 and got["counts"].dtype == np.uint16  # demo counts are below 2**16
        for col, value in expected.items():
            assert np.array_equal(got[col], value), (cell_id, col)
    assert summary["cells_in"] == summary["cells_out"] == SPEC.cells
    assert summary["cells_per_split"] == {s: sum(c["_split"] == s for c in cells.values()) for s in ("train", "valid")}
    labels = json.loads((tmp_path / "mds" / "labels.json").read_text())
    assert set(labels) == set(LABEL_COLUMNS)
    for col in LABEL_COLUMNS:
        assert labels[col] == sorted({c[col] for c in reference.values()} - {""})
    assert len(os.listdir(tmp_path / "mds" / "train")) == SPEC.shards + 1  # one folder per input + index.json


def test_splits_are_deterministic_and_grouped_splits_do_not_leak(demo, tmp_path):
    by_cell = read_all(tmp_path / "a") if _convert(demo, tmp_path / "a") else None
    again = read_all(tmp_path / "b") if _convert(demo, tmp_path / "b") else None
    assert {k: v["_split"] for k, v in by_cell.items()} == {k: v["_split"] for k, v in again.items()}
    assert 0.1 < sum(v["_split"] == "valid" for v in by_cell.values()) / len(by_cell) < 0.3
    grouped = read_all(tmp_path / "c") if _convert(demo, tmp_path / "c", by="sample", valid_fraction=0.3) else None
    split_of_sample: dict[str, set[str]] = {}
    for cell in grouped.values():
        split_of_sample.setdefault(cell["sample"], set()).add(cell["_split"])
    assert all(len(s) == 1 for s in split_of_sample.values())
    assert {"train", "valid"} == set().union(*split_of_sample.values())


def test_settings_change_refuses_to_resume(demo, tmp_path):
    _convert(demo, tmp_path / "mds")
    with pytest.raises(ConversionError, match="different settings \\(split\\)"):
        _convert(demo, tmp_path / "mds", valid_fraction=0.3)


def _to_memory_fs(demo: Path) -> str:
    """Copy the demo dataset into fsspec's in-memory filesystem (a non-local backend: no ``file`` shortcut,
    and forked workers inherit its store); returns its root URL."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in demo.rglob("*.parquet"):
        fs.pipe(f"/demo/{path.relative_to(demo)}", path.read_bytes())
    return "memory:///demo"


@pytest.mark.parametrize("backend", ["file-glob", "memory-dir-2-workers"])
def test_fsspec_url_input_reads_the_same_cells(demo, tmp_path, backend):
    options = WriteOptions(split=SplitSpec(valid_fraction=0.2), shard_size=1 << 16)
    if backend == "file-glob":
        root, data = f"file://{demo}", f"file://{demo / 'data'}/*.parquet"
    else:
        root = _to_memory_fs(demo)
        data, options = f"{root}/data", replace(options, workers=2)
    summary = convert_tahoe(
        data, f"{root}/gene_metadata.parquet", str(tmp_path / "url"), f"{root}/sample_metadata.parquet", options
    )
    assert summary["inputs"] == len(list((demo / "data").glob("*.parquet")))
    _convert(demo, tmp_path / "local")
    url, local = read_all(tmp_path / "url"), read_all(tmp_path / "local")
    for cell in [*url.values(), *local.values()]:
        cell.pop("_split")
    assert same_cells(url, local)


@pytest.mark.slow
def test_kill9_at_three_random_points_then_resume_equals_a_clean_run(tmp_path):
    """Chaos: SIGKILL at 3 seeded random points (after a random number of inputs, a random few ms into the
    next), re-run each time; the cells and indexes equal an uninterrupted conversion's. Run once more on the
    finished output, the converter has nothing to do and changes nothing."""
    demo = tmp_path / "demo"
    make_demo_data(demo, DemoSpec(cells=4800, genes=300, shards=12, mean_library=400.0, seed=5))
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    _convert(demo, clean)
    command = [
        sys.executable,
        str(REPO / "data_prep" / "tahoe_to_mds.py"),
        "--input",
        str(demo / "data"),
        "--gene-metadata",
        str(demo / "gene_metadata.parquet"),
        "--sample-metadata",
        str(demo / "sample_metadata.parquet"),
        "--out",
        str(resumed),
        "--valid-fraction",
        "0.2",
        "--shard-size",
        str(1 << 16),
        "--batch-size",
        "100",
    ]
    rng = random.Random(18)
    for done_before_kill in sorted(rng.sample(range(1, 11), 3)):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while len(list((resumed / ".parts").glob("train-*.json"))) < done_before_kill and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.02))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (resumed / "summary.json").exists(), "killed before the end: no summary may exist"
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["inputs_resumed"] >= 3
    assert same_cells(read_all(clean), read_all(resumed))
    for split in ("train", "valid"):
        assert json.loads((clean / split / "index.json").read_text()) == json.loads(
            (resumed / split / "index.json").read_text()
        )
    leftovers = [p for p in (resumed / "train").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers

    before = {p: p.stat().st_mtime_ns for p in resumed.rglob("*")}
    again = subprocess.run(command, check=True, capture_output=True, text=True)
    assert again.stdout.strip().endswith("cells from 12 input(s)); nothing to do")
    assert {p: p.stat().st_mtime_ns for p in resumed.rglob("*")} == before


@pytest.mark.slow
def test_two_workers_write_what_one_writes(demo, tmp_path):
    _convert(demo, tmp_path / "one")
    options = WriteOptions(split=SplitSpec(valid_fraction=0.2), shard_size=1 << 16, workers=2)
    convert_tahoe(
        str(demo / "data"),
        str(demo / "gene_metadata.parquet"),
        str(tmp_path / "two"),
        str(demo / "sample_metadata.parquet"),
        options,
        batch_size=100,
    )
    assert same_cells(read_all(tmp_path / "one"), read_all(tmp_path / "two"))


def test_read_ahead_keeps_order_raises_in_place_and_closes():
    """Batches produced on the read-ahead thread arrive in order; an error surfaces at the item it replaces
    (after the items before it); a consumer that stops early closes the producer."""
    closed = []

    def produce(n: int, fail_at: int | None = None):
        try:
            for i in range(n):
                if i == fail_at:
                    raise ValueError(f"bad row group {i}")
                yield i
        finally:
            closed.append(n)

    assert list(read_ahead(produce(7), depth=2)) == list(range(7))
    got = []
    with pytest.raises(ValueError, match="bad row group 4"):
        for item in read_ahead(produce(9, fail_at=4), depth=3):
            got.append(item)
    assert got == [0, 1, 2, 3]
    early = read_ahead(produce(100), depth=2)
    assert [next(early) for _ in range(3)] == [0, 1, 2]
    early.close()
    assert closed == [7, 9, 100]  # every producer was closed, the abandoned one included
