"""Verify an MDS dataset: each shard's files, sizes and hashes against the index, samples decoded, a summary.

Prints one line per shard (``ok`` / ``BAD`` and why), then cells, shards and bytes per split; any bad shard,
or cell counts that disagree with data_prep's summary.json, end it with an error line (exit status 2).
Example: ``ddsc check-data /data/tahoe-mds`` (or one split: ``ddsc check-data /data/tahoe-mds/train``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help="dataset folder (train/ valid/ ...) or one split folder")
    parser.add_argument("--decode-all", action="store_true", help="decode every sample (default: 16 per shard)")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ddsc.data.check import ShardCheck, check_split, index_shards, split_dirs, summary_mismatches
    from ddsc.errors import InputError

    root: Path = args.data
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    folders = split_dirs(root)
    splits, shards = [], []
    with tqdm(total=sum(len(index_shards(f)) for f in folders), unit="shard", desc="checking") as bar:
        for folder in folders:
            for item in check_split(folder, root, args.decode_all):
                if isinstance(item, ShardCheck):
                    shards.append(item)
                    tqdm.write(item.line(), file=sys.stdout)
                    bar.update()
                else:
                    splits.append(item)
    for split in splits:
        leftovers = (
            f"; {len(split.unindexed)} file(s) in no index, e.g. {split.unindexed[0]}" if split.unindexed else ""
        )
        print(
            f"{split.split}: {split.samples:,} cells in {len(split.shards):,} shard(s), {split.bytes / 1e6:,.1f} MB{leftovers}"
        )
    bad = [s for s in shards if s.problems]
    problems = [f"{s.path}: {'; '.join(s.problems)}" for s in bad] + summary_mismatches(root, splits)
    if problems:
        more = f" (and {len(problems) - 1} more, listed above)" if len(problems) > 1 else ""
        raise InputError(f"{len(bad)} of {len(shards)} shards bad: {problems[0]}{more}")
    hashed = sum(s.hashed for s in shards)
    verified = (
        f"{hashed:,} with their hashes verified" if hashed else "no hashes in the index: convert again to add them"
    )
    print(f"{root}: all {len(shards):,} shards intact ({verified})")
    return 0
