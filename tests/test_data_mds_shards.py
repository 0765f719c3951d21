"""The bulk MDS shard writer against Streaming's own MDSWriter: same cells -> identical files, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_prep_helpers import read_split
from streaming import MDSWriter
from streaming.base.compression import decompress

from ddsc.data.cells import CellBatch, validate
from ddsc.data.mds_shards import MDSShardWriter, Ragged
from ddsc.data.schema import COUNT_DTYPES, MDS_COLUMNS, METADATA_COLUMNS

HASHES = ["sha1", "xxh64"]  # per-file hashes in the index, as MDSWriter records them (a hashlib and an xxhash one)


def _cells(n: int, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, dict[str, list[str]]]:
    """Ragged cells whose lengths cross every shape-width boundary of the ndarray encoding (uint8 / uint16 /
    uint32) and whose strings include empty and non-ASCII values."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 300, n)
    lengths[[1, 2, 3, 4]] = [255, 256, 65535, 65536]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    genes = rng.integers(3, 2**31 - 1, offsets[-1]).astype(np.int32)
    counts = rng.integers(1, 1000, offsets[-1]).astype(np.int32)
    metadata = {col: [("µ-" + col) * (i % 3) + str(i % 5) * (i % 2) for i in range(n)] for col in METADATA_COLUMNS}
    return [f"cell:{i}" for i in range(n)], offsets, genes, counts, metadata


def _count_dtype(batch_number: int) -> type[np.integer]:
    """Counts (a dynamic-dtype column) alternate between the schema's dtypes from batch to batch."""
    return COUNT_DTYPES[batch_number % len(COUNT_DTYPES)]


def _write_reference(out: Path, cells: tuple, compression: str | None, size_limit: int | None, batch: int) -> None:
    ids, offsets, genes, counts, metadata = cells
    options = {"compression": compression, "size_limit": size_limit, "hashes": HASHES}
    with MDSWriter(columns=MDS_COLUMNS, out=str(out), **options) as writer:
        for i, cell_id in enumerate(ids):
            lo, hi = offsets[i], offsets[i + 1]
            sample = {
                "cell_id": cell_id,
                "genes": genes[lo:hi],
                "counts": counts[lo:hi].astype(_count_dtype(i // batch)),
            }
            writer.write(sample | {col: metadata[col][i] for col in METADATA_COLUMNS})


def _write_bulk(out: Path, cells: tuple, compression: str | None, size_limit: int | None, batch: int) -> None:
    ids, offsets, genes, counts, metadata = cells
    writer = MDSShardWriter(out, MDS_COLUMNS, compression, size_limit, hashes=HASHES)
    for lo in range(0, len(ids), batch):
        rows = slice(lo, lo + batch)
        starts, ends = offsets[:-1][rows], offsets[1:][rows]
        batch_counts = counts.astype(_count_dtype(lo // batch))
        columns = {
            "cell_id": ids[rows],
            "genes": Ragged(genes, starts, ends),
            "counts": Ragged(batch_counts, starts, ends),
        }
        writer.write_batch(columns | {col: metadata[col][rows] for col in METADATA_COLUMNS})
    writer.finish()


@pytest.mark.parametrize(
    ("compression", "size_limit", "batch"),
    [
        ("zstd", 1 << 26, 64),  # the converter's defaults: one shard
        ("zstd:1", 1 << 16, 7),  # many shards, cut inside batches
        (None, 3000, 50),  # samples larger than a shard: MDSWriter's empty first shard and one-sample shards
        ("zstd", None, 1000),  # no size limit
        ("gz", 1 << 15, 64),  # a codec other than zstd: Streaming's own compress
    ],
)
def test_files_identical_to_mdswriter(tmp_path: Path, compression: str | None, size_limit: int | None, batch: int):
    cells = _cells(300)
    _write_reference(tmp_path / "ref", cells, compression, size_limit, batch)
    _write_bulk(tmp_path / "bulk", cells, compression, size_limit, batch)
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "bulk").iterdir())
    assert len(names) > (2 if size_limit and size_limit < 1 << 20 else 1)  # shards + index.json
    stamped = compression == "gz"  # a gzip header holds the time it was written (so do the hashes of .gz files)
    for name in names:
        ref, bulk = (tmp_path / "ref" / name).read_bytes(), (tmp_path / "bulk" / name).read_bytes()
        if compression and name != "index.json":
            assert decompress(compression, ref) == decompress(compression, bulk), name
        if stamped and name == "index.json":
            ref, bulk = (_without_zip_hashes(json.loads(index)) for index in (ref, bulk))
        assert ref == bulk or (stamped and name.endswith(".gz")), name


def _without_zip_hashes(index: dict) -> dict:
    for shard in index["shards"]:
        shard["zip_data"]["hashes"] = {}
    return index


def test_streaming_reads_back_the_input(tmp_path: Path):
    cells = _cells(120, seed=1)
    ids, offsets, genes, counts, metadata = cells
    # Rows picked out of order and with gaps (how the converter hands a split's cells over: views, no copies).
    rows = np.array([5, 0, 7, 3, 2] + list(range(10, 120, 3)))
    writer = MDSShardWriter(tmp_path, MDS_COLUMNS, "zstd", 1 << 15)
    dtype_of = {}
    for number, part in enumerate(np.array_split(rows, 4)):
        dtype_of |= dict.fromkeys(part.tolist(), _count_dtype(number))
        columns = {
            "cell_id": [ids[i] for i in part],
            "genes": Ragged(genes, offsets[part], offsets[part + 1]),
            "counts": Ragged(counts.astype(_count_dtype(number)), offsets[part], offsets[part + 1]),
        }
        writer.write_batch(columns | {col: [metadata[col][i] for i in part] for col in METADATA_COLUMNS})
    writer.finish()
    back = read_split(tmp_path)
    assert list(back) == [ids[i] for i in rows]
    for i in rows:
        sample = back[ids[i]]
        lo, hi = offsets[i], offsets[i + 1]
        assert sample["genes"].dtype == np.int32 and np.array_equal(sample["genes"], genes[lo:hi])
        assert sample["counts"].dtype == dtype_of[i] and np.array_equal(sample["counts"], counts[lo:hi])
        assert {col: sample[col] for col in METADATA_COLUMNS} == {col: metadata[col][i] for col in METADATA_COLUMNS}


def test_bad_batches_are_refused(tmp_path: Path):
    values = np.arange(1, 10, dtype=np.int32)
    strings = {col: ["a", "b"] for col in ["cell_id", *METADATA_COLUMNS]}
    writer = MDSShardWriter(tmp_path, MDS_COLUMNS, "zstd", 1 << 20)
    empty_row = Ragged(values, np.array([0, 4]), np.array([4, 4]))
    with pytest.raises(ValueError, match="'counts': row 1 is empty"):
        writer.write_batch(strings | {"genes": empty_row, "counts": empty_row})
    ok, wrong = Ragged(values, np.array([0, 4]), np.array([4, 9])), Ragged(values.astype(np.int64), [0, 4], [4, 9])
    with pytest.raises(ValueError, match="'genes': expected int32 values, got int64"):
        writer.write_batch(strings | {"genes": wrong, "counts": ok})
    with pytest.raises(ValueError, match="different numbers of rows"):
        writer.write_batch(strings | {"cell_id": ["a"], "genes": ok, "counts": ok})
    with pytest.raises(KeyError, match="plate"):
        writer.write_batch({k: v for k, v in (strings | {"genes": ok, "counts": ok}).items() if k != "plate"})
    with pytest.raises(ValueError, match="'counts': bool values cannot be stored in an MDS ndarray column"):
        writer.write_batch(strings | {"genes": ok, "counts": Ragged(values > 3, [0, 4], [4, 9])})
    with pytest.raises(ValueError, match="'str', 'ndarray' and 'ndarray:<dtype>' columns, not 'pkl'"):
        MDSShardWriter(tmp_path / "x", {"a": "pkl"}, None, None)
    with pytest.raises(ValueError, match="invalid compression"):
        MDSShardWriter(tmp_path / "y", MDS_COLUMNS, "zstd:99", None)
    assert not (tmp_path / "index.json").exists()  # nothing finished, nothing indexed


def test_background_write_error_surfaces_and_nothing_is_indexed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Shards are compressed and written on the writer's thread: a failure there (here the third shard's)
    must reach the caller, and the folder must get no index."""
    import ddsc.data.mds_shards as mds_shards

    calls = []
    write_compressed = mds_shards.write_compressed

    def failing_write(f, pieces: list, size: int, compression: str, zstd) -> None:
        calls.append(size)
        if len(calls) == 3:
            raise OSError("No space left on device")
        write_compressed(f, pieces, size, compression, zstd)

    monkeypatch.setattr(mds_shards, "write_compressed", failing_write)
    with pytest.raises(OSError, match="No space left"):
        _write_bulk(tmp_path, _cells(200, seed=2), "zstd", 1 << 14, 10)
    assert len(calls) == 3  # the failing shard stopped the writer: no later shard was compressed
    assert not (tmp_path / "index.json").exists()


def _validate(genes: list[list[int]], values: list[list[float]], lead: int = 0, dtype=np.float32) -> CellBatch:
    """``validate`` on these cells (values as ``dtype``); with ``lead``, each row first gets that many
    Tahoe-style markers."""
    genes = [[1] * lead + g for g in genes]
    values = [[-2.0] * lead + v for v in values]
    offsets = np.concatenate([[0], np.cumsum([len(g) for g in genes])])
    known = np.zeros(50, dtype=bool)
    known[3:] = True
    known[10] = False  # a hole in the vocab
    n = len(genes)
    flat_genes = np.array([g for cell in genes for g in cell], dtype=np.int64)
    flat_values = np.array([v for cell in values for v in cell], dtype=dtype)
    metadata = {col: [f"{col}{i}" for i in range(n)] for col in METADATA_COLUMNS}
    return validate(
        flat_genes, flat_values, offsets, known, np.zeros(n, np.int8), [f"c{i}" for i in range(n)], metadata, lead
    )


def _kept(batch: CellBatch) -> list[tuple[list[int], list[int]]]:
    """Each kept cell's (genes, counts), read through the batch's bounds; checks the dtypes on the way."""
    largest = int(batch.counts.max(initial=0))
    assert batch.genes.dtype == np.int32
    assert batch.counts.dtype == (np.uint16 if largest < 2**16 else np.int32)
    return [(batch.genes[a:b].tolist(), batch.counts[a:b].tolist()) for a, b in zip(*batch.bounds(), strict=True)]


@pytest.mark.parametrize(("lead", "dtype"), [(0, np.float32), (1, np.float32), (0, np.int64)])
@pytest.mark.parametrize("largest", [2**16 - 1, 2**16])
def test_counts_take_the_narrowest_dtype_that_holds_them(lead, dtype, largest):
    """uint16 up to 65,535, int32 above, on the fast path (clean batch) and the per-cell path alike; an
    integer input's negative count is rejected, not wrapped into range by the narrow cast."""
    fast = _validate([[3, 4]], [[1, largest]], lead, dtype)
    slow = _validate([[3, 4], [8, 8]], [[1, largest], [1, 2]], lead, dtype)  # duplicate gene: per-cell path
    assert fast.counts.dtype == slow.counts.dtype == (np.uint16 if largest < 2**16 else np.int32)
    assert _kept(fast) == _kept(slow) == [([3, 4], [1, largest])]
    assert _validate([[3, 4], [5]], [[1, -(2**16) + 1], [2]], lead, dtype).rejected == {"negative_count": 1}


@pytest.mark.parametrize("lead", [0, 1])
def test_clean_fast_path_equals_per_cell_rules(lead):
    """A clean batch takes the fast path; the same cells beside one bad cell take the per-cell path. The
    kept cells must come out the same either way, with or without a marker entry leading each row."""
    clean_genes, clean_values = [[3, 7, 9], [4], [5, 6, 40, 49]], [[1, 2, 3], [7], [1, 1, 2_000_000_000, 5]]
    fast = _validate(clean_genes, clean_values, lead)
    slow = _validate([*clean_genes, [8, 8]], [*clean_values, [1, 2]], lead)  # a duplicate gene: per-cell path
    assert slow.rejected == {"duplicate_gene": 1} and fast.rejected == {}
    assert fast.cells_in == 3 and slow.cells_in == 4
    assert fast.cell_ids == slow.cell_ids == ["c0", "c1", "c2"]
    expected = [(g, [int(v) for v in c]) for g, c in zip(clean_genes, clean_values, strict=True)]
    assert _kept(fast) == _kept(slow) == expected
    assert fast.lead == lead and slow.lead == 0  # the fast path skips the markers in place, the slow one strips
    assert fast.counts.sum() == slow.counts.sum()  # marker entries count 0
    assert fast.metadata == slow.metadata
    # Each condition the fast path rules out must reach the per-cell rule that counts it.
    assert _validate([[3, 4], [5]], [[1, 2**31], [1]], lead).rejected == {"count_overflow": 1}
    assert _validate([[3, 4], [5]], [[1, 0.5], [1]], lead).rejected == {"non_integer_count": 1}
    assert _kept(_validate([[4, 3], [5]], [[1, 2], [1]], lead)) == [([4, 3], [1, 2]), ([5], [1])]  # order kept
    assert _validate([[3, 60], [5]], [[1, 2], [1]], lead).dropped == {"unknown_gene": 1}
    assert _validate([[3, 4], [5]], [[1, 0], [1]], lead).dropped == {"zero_count": 1}
    assert _validate([[3, 4], []], [[1, 2], []], lead).rejected == {"empty_cell": 1}
    holes = _validate([[3, 20], [5]], [[1, 2], [1]], lead)  # spans the hole at 10: every id is looked up
    assert holes.dropped == {} and _kept(holes) == [([3, 20], [1, 2]), ([5], [1])]
