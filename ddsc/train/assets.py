"""The run's label and gene vocabularies (``labels.json``, ``vocab.json``): where they come from, where they
are read, and fetching them onto a fresh node.

By default both sit beside the first stream's split folders, where data_prep writes them (``data.labels`` /
``data.vocab`` name other files). When that location is remote (the data in object storage), local rank 0 of
each node downloads them into the first stream's local cache folder once the process group exists, and every
rank reads them from there after a barrier. They are fetched again at every start, so a cache never holds the
vocabulary of an older dataset. A missing remote file stops the run with its URL.
"""

from __future__ import annotations

from pathlib import Path

from composer.utils import dist

from ddsc.config import ConfigError
from ddsc.data.remote import fetch, is_url, join
from ddsc.data.schema import LABELS_FILE, VOCAB_FILE
from ddsc.train.config import RunConfig

_KEYS = {LABELS_FILE: "data.labels", VOCAB_FILE: "data.vocab"}


def needed(config: RunConfig) -> list[str]:
    """The files this run reads: the gene vocabulary always, the labels when the model has conditions."""
    return [VOCAB_FILE, LABELS_FILE] if config.model.conditions else [VOCAB_FILE]


def source(config: RunConfig, name: str) -> str:
    """Where ``name`` comes from: its ``data.*`` key, else beside the first stream's splits."""
    explicit = config.data.labels if name == LABELS_FILE else config.data.vocab
    if explicit:
        return explicit
    stream = next(iter(config.data.streams.values()))
    return join(stream.remote or stream.local, name)  # type: ignore[arg-type]  (check_streams: one is set)


def local_path(config: RunConfig, name: str) -> str:
    """The file a rank reads: the source itself when local, else its copy in the first stream's cache."""
    origin = source(config, name)
    if not is_url(origin):
        return origin
    name_, stream = next(iter(config.data.streams.items()))
    if stream.local is None:
        raise ConfigError(f"{_KEYS[name]}: {origin} is remote; set data.streams.{name_}.local (its cache folder)")
    return str(Path(stream.local) / name)


def all_local(config: RunConfig) -> bool:
    return not any(is_url(source(config, name)) for name in needed(config))


def fetch_assets(config: RunConfig) -> None:
    """Download the remote ones on local rank 0 of each node, then wait for every node (a collective)."""
    if all_local(config):
        return
    if dist.get_local_rank() == 0:
        for name in needed(config):
            origin = source(config, name)
            if not is_url(origin):
                continue
            try:
                fetch(origin, Path(local_path(config, name)))
            except FileNotFoundError:
                raise ConfigError(f"{_KEYS[name]}: {origin} not found") from None
            except Exception as err:  # any transport's error (botocore, gcs, http): one line with the URL
                raise ConfigError(f"{_KEYS[name]}: cannot fetch {origin} ({err})") from None
    dist.barrier()
