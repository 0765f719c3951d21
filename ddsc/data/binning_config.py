"""Typed configuration of expression binning (saved with every checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ddsc.config import ConfigError


@dataclass
class BinningConfig:
    """How raw counts become expression bins ``0..num_bins-1``.

    - ``quantile``: per-cell quantiles over the cell's non-zero counts (the original DDSC / scGPT scheme).
    - ``global_log1p``: fixed edges on log1p(count / library size * target_sum): comparable across cells.
    - ``log_uniform`` / ``uniform``: fixed edges on raw counts, up to ``max_count``.
    ``zero_fraction`` > 0 adds unexpressed genes (bin 0, reserved for zeros) to each cell so the model also
    learns dropout.
    """

    method: Literal["quantile", "global_log1p", "log_uniform", "uniform"] = "quantile"
    num_bins: int = 51
    target_sum: float = 10_000.0
    max_value: float = 10.0  # global_log1p: upper edge of the normalised log1p range
    max_count: float = 1_000.0  # log_uniform / uniform: upper edge on raw counts
    zero_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.num_bins < 2:
            raise ConfigError(f"num_bins: need at least 2 bins, got {self.num_bins}")
        if not 0.0 <= self.zero_fraction < 1.0:
            raise ConfigError(f"zero_fraction: must be in [0, 1), got {self.zero_fraction}")
