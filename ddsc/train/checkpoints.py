"""Read the DiT weights out of any training checkpoint: Composer (monolithic or sharded) or DeepSpeed ZeRO.

Formats, as the trainers write them:

- Composer monolithic: one ``.pt`` file, ``{"state": {"model": {...}, "optimizers": ...}, "rng": ...}``.
  Loaded with ``weights_only=True`` plus an allowlist of the plain types Composer stores beside the tensors
  (numpy arrays for the RNG state, a timedelta, the torch version): no arbitrary unpickling.
- Composer sharded (FSDP2, ``torch.distributed.checkpoint``): a folder with ``.metadata`` and ``*.distcp``
  files, keys flattened as ``state.model.<name>``. Only the model tensors are read (not the optimizer state),
  without a process group.
- DeepSpeed ZeRO (any stage): a save folder with a ``latest`` file and tag folders, or one tag folder.
  ``deepspeed.utils.zero_to_fp32`` reassembles the fp32 master weights from the partitions.

Composer's ``latest-rank0.pt`` symlink works for both Composer formats, and so does the save folder holding it. Whatever wraps the DiT (the Composer
model's ``model.`` attribute, DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``, activation checkpointing)
is stripped from the key names so the result loads into a bare ``DiT``.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ddsc.train.checkpoint_integrity import CorruptCheckpointError, composer_problem, deepspeed_problem

# Wrapper prefixes anywhere in a key (DDP, torch.compile, activation checkpointing) and the DiT's attribute in
# DDSCComposerModel (``model.``), removed in that order.
_WRAPPERS = re.compile(r"(^|\.)(module|_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")
_COMPOSER_ATTRIBUTE = "model."
CONFIG_NAMES = ("config.yaml",)


def _composer_safe_globals() -> list:
    from torch.torch_version import TorchVersion

    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.float32, np.int32, np.uint64)]
    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes, datetime.timedelta, TorchVersion]


def strip_wrappers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Key names as in a bare ``DiT``: wrapper prefixes removed, then the Composer model's ``model.``."""
    keys = {k: _WRAPPERS.sub(r"\1", k) for k in state}
    if keys and all(k.startswith(_COMPOSER_ATTRIBUTE) for k in keys.values()):
        keys = {old: new[len(_COMPOSER_ATTRIBUTE) :] for old, new in keys.items()}
    return {keys[k]: v for k, v in state.items()}


COMPOSER_LATEST = "latest-rank0.pt"


def resolve_checkpoint(path: str | Path) -> Path:
    """A Composer save folder stands for its newest checkpoint (the ``latest-rank0.pt`` link inside it)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir() and (path / COMPOSER_LATEST).exists():
        path = path / COMPOSER_LATEST
    return path.resolve()


def checkpoint_kind(path: str | Path) -> str:
    """``composer``, ``composer_sharded`` or ``deepspeed``; a clear error for anything else."""
    resolved = resolve_checkpoint(path)
    if resolved.is_file():
        return "composer"
    if (resolved / ".metadata").is_file():
        return "composer_sharded"
    if (resolved / "latest").is_file() or any(resolved.glob("*model_states.pt")):
        return "deepspeed"
    raise ValueError(
        f"{path}: not a checkpoint (expected a Composer .pt file, a folder with .metadata (Composer sharded) or a "
        "DeepSpeed folder with a 'latest' file or *model_states.pt)"
    )


def _read_composer(path: Path) -> dict[str, Tensor]:
    with torch.serialization.safe_globals(_composer_safe_globals()):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    try:
        return checkpoint["state"]["model"]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: not a Composer checkpoint (no state.model)") from None


def _read_composer_sharded(path: Path) -> dict[str, Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = "state.model."
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {
        key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not state:
        raise ValueError(f"{path}: sharded checkpoint without model tensors (no {prefix}* keys)")
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return {key[len(prefix) :]: value for key, value in state.items()}


def _read_deepspeed(path: Path) -> dict[str, Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if (path / "latest").is_file():
        return get_fp32_state_dict_from_zero_checkpoint(str(path))
    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)  # a tag folder


def verify_checkpoint(path: str | Path) -> None:
    """Raise ``CorruptCheckpointError`` naming the checkpoint when it would not load (truncated, bytes changed,
    never finished), before any reader fails on it with its own error (``ddsc.train.checkpoint_integrity``)."""
    resolved = resolve_checkpoint(path)
    if checkpoint_kind(path) == "deepspeed":
        latest = resolved / "latest"
        resolved = resolved / latest.read_text().strip() if latest.is_file() else resolved
        problem = deepspeed_problem(resolved)
    else:
        problem = composer_problem(resolved)
    if problem is not None:
        raise CorruptCheckpointError(f"{resolved}: corrupt checkpoint: {problem}")


def read_model_state(path: str | Path, verify: bool = True) -> dict[str, Tensor]:
    """The DiT's float32 state dict (bare ``DiT`` key names) from a checkpoint of any supported kind
    (``verify=False``: the caller has run :func:`verify_checkpoint`)."""
    kind = checkpoint_kind(path)
    if verify:
        verify_checkpoint(path)
    resolved = resolve_checkpoint(path)
    reader = {"composer": _read_composer, "composer_sharded": _read_composer_sharded, "deepspeed": _read_deepspeed}
    state = strip_wrappers(reader[kind](resolved))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def find_run_config(path: str | Path) -> Path | None:
    """The run's ``config.yaml``: in the checkpoint folder or one of its two parents (the save folder)."""
    path = Path(path)
    start = path if path.is_dir() else path.parent
    for folder in (start, *list(start.parents)[:2]):
        for name in CONFIG_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def load_exactly(module: torch.nn.Module, state: dict[str, Tensor], context: str) -> None:
    """``module.load_state_dict(state)``, with one message listing the missing, unexpected and resized keys."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    resized = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k])
    if missing or unexpected or resized:
        problems = {"missing": missing, "unexpected": unexpected, "with another shape": resized}
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{'...' if len(keys) > 3 else ''}" for what, keys in problems.items() if keys
        )
        raise ValueError(f"{context} ({detail})")
    module.load_state_dict(state)
