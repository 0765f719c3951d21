"""MDS integrity: data_prep records Streaming's shard hashes, ``ddsc check-data`` finds damaged shards, and a
corrupt shard stops training with one line naming it (with and without ``data.validate_hash``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from data_prep_helpers import read_split
from streaming.base.compression import decompress
from streaming.base.hashing import get_hash
from test_train import tiny_config
from train_data import write_mds

from ddsc.cli import main
from ddsc.data.demo_data import DemoSpec, make_demo_data
from ddsc.data.mds_convert import WriteOptions
from ddsc.data.splits import SplitSpec
from ddsc.data.tahoe import convert_tahoe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A data_prep conversion: 3 inputs -> train/ valid/, several shards per split."""
    tmp = tmp_path_factory.mktemp("check")
    make_demo_data(tmp / "demo", DemoSpec(cells=600, genes=200, shards=3, mean_library=300.0, seed=4))
    options = WriteOptions(split=SplitSpec(valid_fraction=0.2), shard_size=1 << 16)
    demo = tmp / "demo"
    convert_tahoe(
        str(demo / "data"),
        str(demo / "gene_metadata.parquet"),
        str(tmp / "mds"),
        str(demo / "sample_metadata.parquet"),
        options,
    )
    return tmp / "mds"


def _flip(path: Path, at: int, n: int = 8, step: int = 1) -> None:
    """Flip ``n`` bytes from offset ``at``, ``step`` bytes apart."""
    data = bytearray(path.read_bytes())
    for i in range(at, at + n * step, step):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_data_prep_records_streaming_hashes_that_streaming_validates(converted):
    shards = json.loads((converted / "train" / "index.json").read_text())["shards"]
    assert len(shards) > 3 and all(s["hashes"] == ["xxh64"] for s in shards)
    for shard in shards:
        zipped = (converted / "train" / shard["zip_data"]["basename"]).read_bytes()
        assert shard["zip_data"]["hashes"]["xxh64"] == get_hash("xxh64", zipped)
        raw = decompress(shard["compression"], zipped)
        assert shard["raw_data"]["hashes"]["xxh64"] == get_hash("xxh64", raw)
    copy = converted.parent / "validated"
    shutil.copytree(converted, copy)
    assert len(read_split(copy / "train", validate_hash="xxh64")) == sum(s["samples"] for s in shards)


def test_check_data_reports_every_shard_and_names_the_bad_ones(converted, tmp_path, capsys):
    assert main(["check-data", str(converted)]) == 0
    out = capsys.readouterr().out.splitlines()
    summary = json.loads((converted / "summary.json").read_text())["cells_per_split"]
    index = json.loads((converted / "train" / "index.json").read_text())["shards"]
    total = len(index) + len(json.loads((converted / "valid" / "index.json").read_text())["shards"])
    assert sum(line.startswith("ok  train/") and line.endswith("hash ok") for line in out) == len(index)
    assert f"train: {summary['train']:,} cells in {len(index)} shard(s)" in "\n".join(out)
    assert out[-1] == f"{converted}: all {total} shards intact ({total} with their hashes verified)"

    bad = tmp_path / "mds"
    shutil.copytree(converted, bad)
    flipped, truncated = (bad / "train" / index[i]["zip_data"]["basename"] for i in (1, 2))
    _flip(flipped, flipped.stat().st_size // 2)
    truncated.write_bytes(truncated.read_bytes()[:100])
    (bad / "train" / "left.tmp").mkdir()  # a killed conversion's leftovers
    (bad / "train" / "left.tmp" / "shard.00000.mds.zstd").write_bytes(b"partial")
    assert main(["check-data", str(bad)]) == 2
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    rel = lambda p: str(p.relative_to(bad))  # noqa: E731
    assert (
        f"BAD {rel(flipped)}  {index[1]['samples']:,} samples  {flipped.name} fails its xxh64 hash (bytes changed)"
        in lines
    )
    assert any(ln.startswith(f"BAD {rel(truncated)}") and "is 100 bytes, the index says" in ln for ln in lines)
    assert any("1 file(s) in no index, e.g. left.tmp/shard.00000.mds.zstd" in ln for ln in lines)
    assert captured.err.splitlines()[-1].startswith(
        f"ddsc check-data: error: 2 of {total} shards bad: {rel(flipped)}: {flipped.name} fails its xxh64 hash"
    )


def test_check_data_decodes_samples_and_compares_the_summary(converted, tmp_path, capsys):
    bad = tmp_path / "mds"
    shutil.copytree(converted, bad)
    shard = json.loads((bad / "valid" / "index.json").read_text())["shards"][0]
    raw = bad / "valid" / shard["raw_data"]["basename"]  # a decompressed copy, as a reader leaves it
    raw.write_bytes(decompress(shard["compression"], (bad / "valid" / shard["zip_data"]["basename"]).read_bytes()))
    assert main(["check-data", str(bad / "valid")]) == 0  # one split folder; both copies verified
    capsys.readouterr()
    summary = json.loads((bad / "summary.json").read_text())
    summary["cells_per_split"]["valid"] += 1
    (bad / "summary.json").write_text(json.dumps(summary))
    assert main(["check-data", str(bad)]) == 2
    assert "valid: the index holds" in capsys.readouterr().err


def _train(config: Path, data: Path, run: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [f"data.streams.synth.remote={data}", f"trainer.save_folder={run}", "trainer.max_duration=4ba", *overrides]
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), str(config), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_corrupt_shard_stops_training_with_its_path(tmp_path):
    write_mds(tmp_path / "mds")
    config = tiny_config(tmp_path)
    shard = json.loads((tmp_path / "mds" / "train" / "index.json").read_text())["shards"][0]
    train = tmp_path / "mds" / "train"
    zipped, raw = train / shard["zip_data"]["basename"], train / shard["raw_data"]["basename"]

    # A shard decompressed by an earlier epoch, with bytes flipped throughout its samples: they decode to garbage
    # (met within the epoch of 8 batches, in a loader worker).
    raw.write_bytes(decompress(shard["compression"], zipped.read_bytes()))
    _flip(raw, raw.stat().st_size // 3, 100, step=raw.stat().st_size // 200)
    done = _train(config, tmp_path / "mds", tmp_path / "a", "data.num_workers=1", "trainer.max_duration=8ba")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {raw}: corrupt MDS shard: sample ") and "does not decode" in last

    # data.validate_hash checks that decompressed copy before training starts.
    done = _train(config, tmp_path / "mds", tmp_path / "b", "data.validate_hash=xxh64")
    assert (done.returncode, done.stderr.strip().splitlines()[-1]) == (
        2,
        f"error: {raw}: corrupt MDS shard: fails its xxh64 hash (bytes changed) (data.validate_hash=xxh64)",
    )

    # Read through a cache, the damaged compressed shard fails Streaming's own hash check as it is fetched.
    raw.unlink()
    _flip(zipped, zipped.stat().st_size // 2)
    cache = [f"data.streams.synth.local={tmp_path / 'cache'}", f"data.labels={tmp_path / 'mds' / 'labels.json'}"]
    done = _train(config, tmp_path / "mds", tmp_path / "c", "data.validate_hash=xxh64", *cache)
    zipped = tmp_path / "cache" / "train" / zipped.name  # Streaming names its cached copy
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"error: {zipped}: corrupt MDS shard: fails its hash or does not decompress (ValueError: Checksum failure"
        )
    )
