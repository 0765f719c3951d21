"""The ``data:`` section of a run config: the MDS streams and how cells are read from them.

It lives in the data layer, below training, because the readers that consume it (``ddsc.data.streaming``,
``ddsc.data.check``) are data code; ``ddsc.train.config.RunConfig`` composes it with the other sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ddsc.config import ConfigError
from ddsc.data.binning_config import BinningConfig


@dataclass
class StreamConfig:
    """One MDS stream (a dataset root holding split folders ``train/``, ``valid/``, ...)."""

    remote: str | None = None  # s3://, gs://, oci://, hf:// ... or a local path
    local: str | None = None  # local cache folder (required when remote is a URL)
    proportion: float | None = None  # relative sampling weight across streams


@dataclass
class DataConfig:
    streams: dict[str, StreamConfig]
    labels: str | None = None  # labels.json written by data_prep (condition label vocabulary)
    vocab: str | None = None  # vocab.json (gene vocabulary) for HF exports; default: beside the first stream
    train_split: str = "train"
    eval_split: str | None = "valid"
    max_length: int = 1024  # genes per cell after <cls>; longer cells keep a random subset
    binning: BinningConfig = field(default_factory=BinningConfig)
    shuffle: bool = True
    shuffle_seed: int = 17
    num_workers: int = 2
    # The shuffle depends on num_canonical_nodes, not on the number of ranks or nodes reading it: pin it so
    # a run resized (or resumed on another cluster shape) sees the same sample order. None: Streaming's default.
    num_canonical_nodes: int | None = None
    predownload: int | None = None  # samples to download ahead per worker (None: Streaming's default)
    cache_limit: str | None = None  # e.g. "100gb": evict shards from the local cache above this size
    # A hash recorded in the MDS index (data_prep writes "xxh64"): every shard file is checked against it when
    # it is downloaded or decompressed (Streaming) and, in a filesystem stream, before training starts.
    validate_hash: str | None = None

    def __post_init__(self) -> None:
        if not self.streams:
            raise ConfigError("data.streams: at least one stream is required")
        if self.max_length < 1:
            raise ConfigError(f"data.max_length: must be positive, got {self.max_length}")
