"""MosaicML Streaming datasets and loaders built from ``DataConfig``.

Training reads MDS shards (written by ``data_prep``) through ``StreamingDataset``: several named streams
mixed by ``proportion``, a shuffle that depends only on ``shuffle_seed`` and ``num_canonical_nodes`` (not on
how many ranks or nodes read it), and a ``StreamingDataLoader`` whose state lets a run resume in the middle
of an epoch without repeating or skipping samples. Each stream root holds split folders (``train/``,
``valid/``); the split is appended here, so one config serves both.

Streaming assumes one node per host: each node's local leader registers its shared-memory names (in
``/dev/shm``, global to the host) under the first free integer prefix. Several nodes on one host (the loopback
multi-node test, or a scheduler packing two small "nodes" on one machine) would scan at the same time and
claim the same prefix (``FileExistsError: '/000000_locals'``), and would share one download cache. When the
ranks find that their nodes share a host, each node scans only its own residue class of prefixes and gets its
own cache subfolder; with one node per host nothing changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as tdist
from streaming import Stream, StreamingDataLoader, StreamingDataset
from streaming.base.shared import prefix as shm_prefix

from ddsc.config import ConfigError
from ddsc.data.checked_dataset import CheckedStreamingDataset
from ddsc.data.config import DataConfig, StreamConfig


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


@dataclass(frozen=True)
class HostShare:
    """This node's place among the Streaming nodes (groups of ``LOCAL_WORLD_SIZE`` ranks) running on its host,
    and how many nodes the run has in all."""

    index: int = 0
    count: int = 1
    nodes: int = 1


def host_share() -> HostShare:
    """Which of the nodes on this host we are (a collective: every rank must call it; trivial without dist)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return HostShare()
    node = tdist.get_rank() // int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # Streaming's own node numbering
    everyone: list[tuple[str, int] | None] = [None] * tdist.get_world_size()
    tdist.all_gather_object(everyone, (socket.gethostname(), node))
    here = sorted({n for host, n in everyone if host == socket.gethostname()})  # type: ignore[misc]
    return HostShare(index=here.index(node), count=len(here), nodes=len({n for _, n in everyone}))  # type: ignore[misc]


@contextlib.contextmanager
def _own_shm_prefixes(share: HostShare) -> Iterator[None]:
    """While a dataset registers itself, node ``i`` of ``n`` on this host only considers prefixes ``i, i+n, ...``.

    Streaming has no option for this; the prefix search (``streaming.base.shared.prefix``, read only while a
    ``StreamingDataset`` is constructed) is redirected for that call and restored at once. Every shared-memory
    name and file lock is derived from the prefix the dataset stores, so workers need nothing.
    """
    if share.count == 1:
        yield
        return
    original = shm_prefix._each_prefix_int
    shm_prefix._each_prefix_int = lambda: itertools.count(share.index, share.count)
    try:
        yield
    finally:
        shm_prefix._each_prefix_int = original


def node_cache(path: str, split: str) -> str:
    """A node-local cache folder (under ``TMPDIR``) for the MDS dataset at ``path``, named by the path and its
    split's index file (a dataset rewritten in place gets a fresh cache, not the old shards)."""
    index = os.stat(os.path.join(path, split, "index.json"))
    key = f"{os.path.abspath(path)}:{index.st_mtime_ns}:{index.st_size}"
    return os.path.join(tempfile.gettempdir(), "ddsc-streams", hashlib.sha1(key.encode()).hexdigest()[:16])


def _streams(data: DataConfig, split: str, share: HostShare) -> list[Stream]:
    streams = []
    for stream in data.streams.values():
        if stream.remote is not None and not is_remote(stream.remote) and stream.local is None:
            if share.nodes == 1:
                # A filesystem "remote" with no cache folder is read in place instead of copied to a temp dir.
                streams.append(Stream(local=stream.remote, split=split, proportion=stream.proportion))
                continue
            # With several nodes, a folder read in place is shared by all of them (a shared filesystem), and
            # each node's Streaming would decompress the same shards into it at once (a rename race): each node
            # copies into its own cache instead.
            stream = dataclasses.replace(stream, local=node_cache(stream.remote, split))
        local = stream.local
        if stream.remote is not None and local is not None and share.count > 1:
            local = os.path.join(local, f"node{share.index}")  # a download cache cannot be shared by two nodes
        streams.append(Stream(remote=stream.remote, local=local, split=split, proportion=stream.proportion))
    return streams


def build_dataset(data: DataConfig, split: str, batch_size: int, train: bool) -> StreamingDataset:
    """One ``StreamingDataset`` over all streams of ``split``; ``batch_size`` is the per-rank batch size.

    Evaluation is never shuffled, so every evaluation sees the same cells in the same order. With several
    ranks, call this after ``torch.distributed`` is initialised (Streaming synchronises its ranks with barriers).
    """
    share = host_share()
    with _own_shm_prefixes(share):
        return CheckedStreamingDataset(
            streams=_streams(data, split, share),
            batch_size=batch_size,
            shuffle=data.shuffle and train,
            shuffle_seed=data.shuffle_seed,
            num_canonical_nodes=data.num_canonical_nodes,
            predownload=data.predownload,
            cache_limit=data.cache_limit,
            validate_hash=data.validate_hash,
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
