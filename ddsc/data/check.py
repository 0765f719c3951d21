"""Verify an MDS dataset (``ddsc check-data DIR``): every shard against its index, then a summary.

For each split folder (``DIR`` itself when it holds ``index.json``, else its ``train/ valid/ test/``):

* index vs files: every file the index names exists with the size it records; files beside them that no
  index names (the leftovers of a killed conversion) are listed;
* hashes: every file present (compressed and, once a reader has decompressed it, decompressed) against the
  hash the index records (data_prep writes xxh64; a dataset without hashes is reported as such);
* decoding: the shard's sample table is consistent with the index, and samples spread over the shard (or
  all, ``--decode-all``) decode with Streaming's own reader into the DDSC schema (genes and counts of one
  length, counts > 0);
* summary: shards, cells and bytes per split, and the cell counts against ``summary.json`` when data_prep
  wrote one.

Training uses the hash part before it starts when ``data.validate_hash`` is set (:func:`verify_local_shards`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from streaming.base.compression import decompress
from streaming.base.format import reader_from_json
from streaming.base.hashing import get_hash, is_hash

from ddsc.data.checked_dataset import CorruptShardError
from ddsc.data.config import DataConfig
from ddsc.data.mds_convert import INDEX_FILE
from ddsc.data.schema import MDS_COLUMNS, SUMMARY_FILE
from ddsc.data.splits import SPLITS
from ddsc.data.streaming import is_remote, stream_root
from ddsc.errors import InputError

DECODED_PER_SHARD = 16  # samples decoded per shard unless every one is asked for


@dataclass
class ShardCheck:
    """What checking one shard found; ``problems`` empty means it is intact."""

    path: str  # relative to the dataset folder
    samples: int
    problems: list[str] = field(default_factory=list)
    hashed: bool = False

    def line(self) -> str:
        state = "ok " if not self.problems else "BAD"
        detail = "; ".join(self.problems) if self.problems else ("hash ok" if self.hashed else "no hash in index")
        return f"{state} {self.path}  {self.samples:,} samples  {detail}"


@dataclass
class SplitCheck:
    split: str
    shards: list[ShardCheck]
    samples: int
    bytes: int
    unindexed: list[str]


def split_dirs(root: Path) -> list[Path]:
    """The split folders of a dataset root, or the root itself when it is one split."""
    if (root / INDEX_FILE).is_file():
        return [root]
    found = [root / s for s in SPLITS if (root / s / INDEX_FILE).is_file()]
    if not found:
        raise InputError(f"{root}: not an MDS dataset (no {INDEX_FILE} in it or in {', '.join(SPLITS)}/)")
    return found


def index_shards(split_dir: Path) -> list[dict]:
    """The shard entries of the split's (merged) ``index.json``."""
    try:
        return json.loads((split_dir / INDEX_FILE).read_text())["shards"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{split_dir / INDEX_FILE}: not an MDS index ({type(err).__name__}: {err})") from None


def _files(shard: dict) -> Iterator[tuple[str, dict]]:
    """(kind, file info) of the shard's decompressed (``raw_data``) and compressed (``zip_data``) files."""
    for kind in ("raw_data", "zip_data"):
        if shard.get(kind):
            yield kind, shard[kind]


def _stored(shard: dict) -> dict:
    """The file a converter wrote: the compressed one, if the shard is compressed."""
    return shard.get("zip_data") or shard["raw_data"]


def _file_problems(
    split_dir: Path, shard: dict, algo: str | None
) -> tuple[list[tuple[str, str]], dict[str, bytes], bool]:
    """([(file basename, what is wrong)], the intact files' bytes by kind, whether a hash was checked) for the
    shard's files present. ``algo``: the hash to check (None: the first the index records, if any)."""
    problems, contents, hashed = [], {}, False
    present = [(kind, info) for kind, info in _files(shard) if (split_dir / info["basename"]).is_file()]
    if not present:  # one is enough: the decompressed copy exists once a reader made it (and may drop the other)
        problems.append((_stored(shard)["basename"], "missing"))
    for kind, info in present:
        data = (split_dir / info["basename"]).read_bytes()
        hashes = info.get("hashes") or {}
        name = algo or min(hashes, default=None)
        if len(data) != info["bytes"]:
            problems.append(
                (info["basename"], f"is {len(data):,} bytes, the index says {info['bytes']:,} (truncated?)")
            )
        elif name is not None and name not in hashes:
            problems.append((info["basename"], f"has no {name} hash in the index"))
        elif name is not None and get_hash(name, data) != hashes[name]:
            problems.append((info["basename"], f"fails its {name} hash (bytes changed)"))
        else:
            contents[kind] = data
        hashed = hashed or name in hashes
    return problems, contents, hashed


def _decode_problems(split_dir: Path, shard: dict, raw: bytes, decode_all: bool) -> list[str]:
    """Check the shard's sample table and decode samples with Streaming's reader (MDS format)."""
    n = shard["samples"]
    header = int(np.frombuffer(raw, np.uint32, count=1)[0]) if len(raw) >= 4 else -1
    if header != n:
        return [f"the shard holds {header} samples, the index says {n}"]
    offsets = np.frombuffer(raw, np.uint32, count=n + 1, offset=4).astype(np.int64)
    if np.any(np.diff(offsets) < 0) or offsets[-1] != len(raw):
        return ["its sample table does not match its size"]
    reader = reader_from_json(str(split_dir), None, shard)
    picks = range(n) if decode_all else sorted(set(np.linspace(0, n - 1, min(n, DECODED_PER_SHARD)).astype(int)))
    for i in picks:
        try:
            sample = reader.decode_sample(raw[offsets[i] : offsets[i + 1]])
        except Exception as err:  # whatever damaged bytes make the decoder raise
            return [f"sample {i} does not decode ({type(err).__name__}: {err})"]
        if set(sample) != set(MDS_COLUMNS):
            return [f"sample {i} has columns {sorted(sample)}, not the DDSC schema's"]
        genes, counts = sample["genes"], sample["counts"]
        if len(genes) != len(counts) or not len(genes) or counts.min() <= 0:
            return [f"sample {i} ({sample['cell_id']!r}): {len(genes)} genes, {len(counts)} counts, not all > 0"]
    return []


def check_shard(split_dir: Path, shard: dict, root: Path, decode_all: bool = False) -> ShardCheck:
    """Files, hashes and decoding of one shard of the index of ``split_dir`` (paths relative to ``root``)."""
    report = ShardCheck(str((split_dir / _stored(shard)["basename"]).relative_to(root)), int(shard["samples"]))
    problems, contents, report.hashed = _file_problems(split_dir, shard, None)
    report.problems = [f"{Path(name).name} {what}" for name, what in problems]
    if report.problems:
        return report
    raw, source = contents.get("raw_data"), Path(shard["raw_data"]["basename"]).name
    if raw is None:
        source = Path(shard["zip_data"]["basename"]).name
        try:
            raw = decompress(shard["compression"], contents["zip_data"])
        except Exception as err:  # each codec has its own error type
            report.problems.append(f"{source} does not decompress ({type(err).__name__}: {err})")
            return report
    report.problems = [f"{source}: {p}" for p in _decode_problems(split_dir, shard, raw, decode_all)]
    return report


def _unindexed(split_dir: Path, shards: list[dict]) -> list[str]:
    named = {split_dir / info["basename"] for shard in shards for _, info in _files(shard)}
    folders = {p.parent for p in named}
    return sorted(
        str(p.relative_to(split_dir))
        for p in split_dir.rglob("*")
        if p.is_file() and p not in named and not (p.name == INDEX_FILE and p.parent in folders | {split_dir})
    )


def check_split(split_dir: Path, root: Path, decode_all: bool = False) -> Iterator[ShardCheck | SplitCheck]:
    """Each shard's check as it is done, then the split's summary."""
    shards = index_shards(split_dir)
    checks = []
    for shard in shards:
        checks.append(check_shard(split_dir, shard, root, decode_all))
        yield checks[-1]
    size = sum(_stored(shard)["bytes"] for shard in shards)
    yield SplitCheck(split_dir.name, checks, sum(c.samples for c in checks), size, _unindexed(split_dir, shards))


def summary_mismatches(root: Path, splits: list[SplitCheck]) -> list[str]:
    """Cells per split in the index against data_prep's ``summary.json`` (none when there is no summary)."""
    path = root / SUMMARY_FILE
    if not path.is_file():
        return []
    expected = json.loads(path.read_text()).get("cells_per_split", {})
    return [
        f"{s.split}: the index holds {s.samples:,} cells, {SUMMARY_FILE} says {expected[s.split]:,}"
        for s in splits
        if s.split in expected and expected[s.split] != s.samples
    ]


def verify_hashes(split_dir: Path, algo: str) -> None:
    """Every shard file present in ``split_dir`` against the index's ``algo`` hash (training's pre-check)."""
    if not is_hash(algo):
        raise InputError(f"data.validate_hash: {algo!r} is not a hash algorithm Streaming knows (e.g. xxh64)")
    for shard in index_shards(split_dir):
        problems, _, _ = _file_problems(split_dir, shard, algo)
        if problems:
            name, what = problems[0]
            raise CorruptShardError(f"{split_dir / name}: corrupt MDS shard: {what} (data.validate_hash={algo})")


def verify_local_shards(data: DataConfig) -> None:
    """With ``data.validate_hash``: the shards already in the filesystem folders of the streams, before training.

    Streaming checks a file's hash only when it downloads or decompresses it, and reads a shard already
    decompressed in a local folder (any read-in-place dataset after its first epoch) without checking.
    Run on each node's local rank 0; the other ranks wait for it when the process group forms.
    """
    if not data.validate_hash or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    for split in dict.fromkeys(s for s in (data.train_split, data.eval_split) if s):
        for stream in data.streams.values():
            root = stream_root(stream)
            if not is_remote(root) and (Path(root) / split / INDEX_FILE).is_file():
                verify_hashes(Path(root) / split, data.validate_hash)
