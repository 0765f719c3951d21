"""MosaicML Streaming datasets and loaders built from ``DataConfig``.

Training reads MDS shards (written by ``data_prep``) through ``StreamingDataset``: several named streams
mixed by ``proportion``, a shuffle that depends only on ``shuffle_seed`` and ``num_canonical_nodes`` (not on
how many ranks or nodes read it), and a ``StreamingDataLoader`` whose state lets a run resume in the middle
of an epoch without repeating or skipping samples. Each stream root holds split folders (``train/``,
``valid/``); the split is appended here, so one config serves both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from streaming import Stream, StreamingDataLoader, StreamingDataset

from ddsc.config import ConfigError
from ddsc.train.config import DataConfig, StreamConfig


def is_remote(path: str) -> bool:
    """True for object-store URIs (``s3://``, ``gs://``, ``hf://`` ...), False for filesystem paths."""
    return "://" in path


def stream_root(stream: StreamConfig) -> str:
    """Where the stream's files live: the local cache if given, else the remote (which may be a local path)."""
    root = stream.local or stream.remote
    assert root is not None  # checked by check_streams
    return root


def check_streams(data: DataConfig, split: str) -> None:
    """Fail with the stream's name before any worker starts if a local split folder is missing."""
    for name, stream in data.streams.items():
        if stream.remote is None and stream.local is None:
            raise ConfigError(f"data.streams.{name}: set 'remote' or 'local'")
        if stream.remote is not None and is_remote(stream.remote) and stream.local is None:
            raise ConfigError(f"data.streams.{name}.local: required as the cache folder for remote {stream.remote}")
        if stream.remote is None or not is_remote(stream.remote):
            index = Path(stream.remote or stream.local) / split / "index.json"  # type: ignore[arg-type]
            if not index.is_file():
                raise ConfigError(f"data.streams.{name}: no MDS split '{split}' ({index} not found)")


def _streams(data: DataConfig, split: str) -> list[Stream]:
    streams = []
    for stream in data.streams.values():
        if stream.remote is not None and not is_remote(stream.remote) and stream.local is None:
            # A filesystem "remote" with no cache folder is read in place instead of copied to a temp dir.
            streams.append(Stream(local=stream.remote, split=split, proportion=stream.proportion))
        else:
            streams.append(Stream(remote=stream.remote, local=stream.local, split=split, proportion=stream.proportion))
    return streams


def build_dataset(data: DataConfig, split: str, batch_size: int, train: bool) -> StreamingDataset:
    """One ``StreamingDataset`` over all streams of ``split``; ``batch_size`` is the per-rank batch size.

    Evaluation is never shuffled, so every evaluation sees the same cells in the same order.
    """
    return StreamingDataset(
        streams=_streams(data, split),
        batch_size=batch_size,
        shuffle=data.shuffle and train,
        shuffle_seed=data.shuffle_seed,
        num_canonical_nodes=data.num_canonical_nodes,
        predownload=data.predownload,
        cache_limit=data.cache_limit,
        allow_unsafe_types=False,
    )


def build_dataloader(
    data: DataConfig, split: str, batch_size: int, collate_fn: Callable, train: bool
) -> StreamingDataLoader:
    """A ``StreamingDataLoader`` (its ``state_dict`` records the samples seen, for mid-epoch resumption)."""
    dataset = build_dataset(data, split, batch_size, train)
    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate_fn,
        num_workers=data.num_workers,
        drop_last=train,
        persistent_workers=data.num_workers > 0,
        prefetch_factor=2 if data.num_workers > 0 else None,
    )
