"""Typed configuration of the masked diffusion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ddsc.config import ConfigError


@dataclass
class DiffusionConfig:
    """Continuous-time absorbing-state diffusion (MDLM). ``eps`` keeps alpha_1 = eps > 0."""

    schedule: Literal["loglinear", "cosine", "linear"] = "loglinear"
    eps: float = 1e-3
    antithetic: bool = True
    # weight of the auxiliary cell-embedding loss (the cell decoder's CE on the masked genes, ``cell_ce``); 0: off
    cell_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"eps: must be in (0, 1), got {self.eps}")
        if self.cell_loss_weight < 0:
            raise ConfigError(f"cell_loss_weight: must be >= 0, got {self.cell_loss_weight}")
