"""The run's save folder: the resolved config kept beside the checkpoints, and the resume compatibility check.

A checkpoint is only meaningful with the config that produced it (architecture, binning, diffusion), so
``config.yaml`` sits next to every checkpoint. Before an autoresume loads weights, the saved config is compared
with the new one: a change that would make the weights mean something else stops the run with the key named,
instead of a shape error deep in ``load_state_dict`` (or, worse, a silent mismatch such as other bins).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from ddsc.config import ConfigError, from_dict, save_config, to_dict
from ddsc.data.streaming import is_remote
from ddsc.train.config import RunConfig

CONFIG_FILE = "config.yaml"
COMPOSER_LATEST = "latest-rank0.pt"  # the pointer Composer keeps to its newest checkpoint (save_latest_filename)

# Dotted prefixes that must not change across a resume; everything else (durations, intervals, loggers, the
# number of ranks, the LR) may.
FROZEN_KEYS = (
    "family",
    "model",
    "data.binning",
    "data.max_length",
    "diffusion",
    "latent_vae",
    *(f"latent_dit.{k}" for k in ("d_model", "n_layers", "n_heads", "mlp_ratio", "latent_sample", "latent_std")),
    "optimizer.name",
    "parallelism.engine",
)


def resolve_save_folder(config: RunConfig) -> str | None:
    folder = config.trainer.save_folder
    return folder.replace("{run_name}", config.trainer.run_name) if folder else None


def composer_resume_path(save_folder: str | None, autoresume: bool) -> str | None:
    """The Composer checkpoint an autoresumed run loads from a filesystem ``save_folder``, or None.

    Composer's own autoresume is kept for object stores only. On a filesystem folder shared by several nodes
    (NFS, Lustre, GPFS) it fails: the local rank 0 of every node creates and then deletes the same signal file
    beside the checkpoints, so one node's delete finds the file gone (``FileNotFoundError``), even on the first
    launch. This does what it does with none of that: rank 0 follows the ``latest-rank0.pt`` pointer Composer
    keeps in the folder, every rank gets the answer, and the trainer loads it as an explicit ``load_path``
    (Composer downloads it through a node-local temporary folder, which no other node sees).
    """
    if not autoresume or save_folder is None or is_remote(save_folder):
        return None
    from composer.utils import dist

    latest = Path(save_folder) / COMPOSER_LATEST
    found = [str(latest.resolve()) if latest.exists() else None]
    dist.broadcast_object_list(found, src=0)
    return found[0]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): tree}


def check_compatible(saved: dict, config: RunConfig) -> None:
    """Raise ConfigError naming the first frozen key whose value differs from the saved run's.

    The saved config is first read through today's schema, so a key added since (absent from an older run's
    file) compares as its default: upgrading ddsc must not stop an older run from resuming unchanged. A saved
    file the schema no longer reads (a key removed since) stops the resume with the schema's message.
    """
    try:
        saved = to_dict(from_dict(RunConfig, saved))
    except ConfigError as err:
        raise ConfigError(f"cannot resume: the saved run's config.yaml does not fit this version: {err}") from None
    old, new = _flatten(saved), _flatten(to_dict(config))
    for key in sorted(set(old) | set(new)):
        if key.startswith(FROZEN_KEYS) and old.get(key) != new.get(key):
            raise ConfigError(
                f"cannot resume: '{key}' was {old.get(key)!r} in the saved run but is {new.get(key)!r} now "
                "(use a new run_name / save_folder to start a different run)"
            )


def _object_store(folder: str):
    from composer.utils import maybe_create_object_store_from_uri, parse_uri

    _, _, prefix = parse_uri(folder)
    return maybe_create_object_store_from_uri(folder), prefix.strip("/")


def read_saved_config(folder: str) -> dict | None:
    """The saved run's config as a plain tree, or None for a fresh run (no config.yaml yet)."""
    if not is_remote(folder):
        path = Path(folder) / CONFIG_FILE
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    store, prefix = _object_store(folder)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / CONFIG_FILE
        try:
            store.download_object(f"{prefix}/{CONFIG_FILE}", str(local))
        except FileNotFoundError:
            return None
        return yaml.safe_load(local.read_text())


def write_config(folder: str, config: RunConfig) -> None:
    """Write (or upload) ``config.yaml``; called on rank 0 only."""
    if not is_remote(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_config(config, Path(folder) / CONFIG_FILE)
        return
    store, prefix = _object_store(folder)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / CONFIG_FILE
        save_config(config, local)
        store.upload_object(f"{prefix}/{CONFIG_FILE}", str(local))
