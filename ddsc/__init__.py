"""DDSC: gene-ID-conditioned DiT masked discrete diffusion for single-cell expression."""

__version__ = "0.1.0"

# Loaded on first use so ``import ddsc`` (and ``ddsc --help``) does not pull in torch and transformers.
_LAZY = {"DDSCConfig": "ddsc.model.hf", "DDSCModel": "ddsc.model.hf", "Predictor": "ddsc.inference"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ddsc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
