"""Typed configuration of the DiT backbone, with size presets.

This module imports nothing from ``ddsc``: it ships verbatim inside every Hugging Face export (with the
DiT itself) so that ``AutoModel.from_pretrained(dir, trust_remote_code=True)`` works without ``ddsc``.
Validation errors are plain ``ValueError``; the config loader adds the key path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ConfigError = ValueError


@dataclass
class ConditionConfig:
    """One cell-level condition that modulates every block through adaLN-Zero.

    ``name`` is an MDS metadata column (``cell_line_id``, ``drug``, ``dose``, ...). During training the label is
    replaced by the learned null label with probability ``dropout``, which is what makes classifier-free
    guidance possible at sampling time.
    """

    name: str
    dropout: float = 0.1
    num_labels: int = 0  # real labels, without the null label (id 0); 0 = fill from the label vocabulary

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout <= 1.0:
            raise ConfigError(f"conditions.{self.name}.dropout: must be in [0, 1], got {self.dropout}")


# (d_model, n_layers, n_heads). "ddsc" is the size of the original DDSC model. Parameter counts (DiT.num_params,
# Tahoe gene vocabulary, 51 bins, no conditions) include the adaLN maps (6 d^2 per block, a third of each block).
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 2, 4),  # 4M (0.2M outside the embeddings)
    "small": (256, 4, 4),  # 21M
    "ddsc": (768, 12, 12),  # 177M (129M outside the embeddings)
    "large": (1024, 24, 16),  # 520M
    "xl": (1536, 22, 16),  # 1.04B (0.94B outside the embeddings)
}


@dataclass
class ModelConfig:
    """The DiT: gene embedding + expression embedding per position, no positional encoding."""

    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    gene_vocab_size: int = 62_710  # Tahoe-100M gene_metadata rows (ids 0..2 are specials)
    num_bins: int = 51  # must equal data.binning.num_bins (checked by RunConfig)
    time_conditioning: bool = False  # MDLM's log-linear schedule works without t; optional
    # "unpadded": position-wise layers on real tokens only, attention without a mask when nothing is padding
    # (see ``ddsc.model.dit.Layout``); "masked": every position with a key-padding mask (the reference).
    attention: Literal["unpadded", "masked"] = "unpadded"
    conditions: list[ConditionConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"n_heads: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.attention not in ("unpadded", "masked"):
            raise ConfigError(f"attention: must be 'unpadded' or 'masked', got {self.attention!r}")
        for name in ("d_model", "n_layers", "n_heads", "gene_vocab_size", "num_bins"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> ModelConfig:
        if preset not in PRESETS:
            raise ConfigError(f"unknown model preset '{preset}' (choose from {', '.join(PRESETS)})")
        d_model, n_layers, n_heads = PRESETS[preset]
        return cls(d_model=d_model, n_layers=n_layers, n_heads=n_heads, **overrides)
