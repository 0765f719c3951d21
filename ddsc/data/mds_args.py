"""Command-line options shared by the MDS converters (one definition, so both scripts agree)."""

from __future__ import annotations

import argparse

from ddsc.data.mds_convert import WriteOptions
from ddsc.data.splits import SPLIT_BY, SplitSpec


def add_write_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder: train/ valid/ [test/] vocab.json labels.json ...")
    parser.add_argument("--workers", type=int, default=1, help="processes, one input file each (default %(default)s)")
    parser.add_argument("--valid-fraction", type=float, default=0.01, help="default %(default)s")
    parser.add_argument("--test-fraction", type=float, default=0.0, help="default %(default)s (no test/ split)")
    parser.add_argument(
        "--split-by",
        choices=SPLIT_BY,
        default="cell",
        help="hash unit: each cell, or whole wells (sample) / plates so none leaks (default cell)",
    )
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the split hash (default %(default)s)")
    parser.add_argument(
        "--compression",
        default=WriteOptions.compression,
        help="MDS shard compression, any Streaming codec: zstd:LEVEL, zstd (= zstd:3: 7-17%% smaller shards, "
        "a 1.4-1.8x slower codec), none (default %(default)s)",
    )
    parser.add_argument(
        "--shard-size", type=int, default=WriteOptions.shard_size, help="bytes per shard before compression"
    )


def write_options(args: argparse.Namespace) -> WriteOptions:
    split = SplitSpec(args.valid_fraction, args.test_fraction, args.split_by, args.split_seed)
    compression = "" if args.compression == "none" else args.compression
    return WriteOptions(split=split, compression=compression, shard_size=args.shard_size, workers=args.workers)
