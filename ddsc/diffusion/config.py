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

    def __post_init__(self) -> None:
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"eps: must be in (0, 1), got {self.eps}")
