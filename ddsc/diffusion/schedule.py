"""Noise schedules of the absorbing ("mask") diffusion: alpha(t) = P(token still clean at time t).

A token is masked at time t with probability 1 - alpha(t); alpha(0) = 1 and alpha(1) = eps > 0. The MDLM
continuous-time NELBO weights the cross-entropy of each masked token by ``weight(t) = -alpha'(t) / (1 - alpha(t))``.

- ``loglinear`` (default, MDLM): alpha = 1 - (1 - eps) t, so weight = 1 / t exactly.
- ``cosine``: 1 - alpha = (1 - eps)(1 - cos(pi t / 2)): masks slowly at first.
- ``linear``: linear noise rate, alpha = exp(-t * log(1 / eps)) = eps^t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ddsc.diffusion.config import DiffusionConfig


@dataclass(frozen=True)
class Schedule:
    name: str
    eps: float

    def alpha(self, t: Tensor) -> Tensor:
        if self.name == "loglinear":
            return 1 - (1 - self.eps) * t
        if self.name == "cosine":
            return 1 - (1 - self.eps) * (1 - torch.cos(0.5 * math.pi * t))
        return torch.exp(-t * math.log(1 / self.eps))

    def alpha_prime(self, t: Tensor) -> Tensor:
        """d alpha / dt (negative)."""
        if self.name == "loglinear":
            return torch.full_like(t, -(1 - self.eps))
        if self.name == "cosine":
            return -(1 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t)
        return -math.log(1 / self.eps) * self.alpha(t)

    def time_of(self, masked_fraction: Tensor) -> Tensor:
        """The t at which a token is masked with probability ``masked_fraction`` (``1 - alpha(t)``), in
        ``[0, 1]``: the inverse of ``1 - alpha``, closed form per schedule (a fraction above ``1 - eps`` -> 1)."""
        m = masked_fraction.clamp(0.0, 1 - self.eps)
        if self.name == "loglinear":
            t = m / (1 - self.eps)
        elif self.name == "cosine":
            t = torch.acos(1 - m / (1 - self.eps)) * (2 / math.pi)
        else:
            t = -torch.log1p(-m) / math.log(1 / self.eps)
        return t.clamp(0.0, 1.0)

    def weight(self, t: Tensor) -> Tensor:
        """NELBO weight per masked token, ``-alpha'(t) / (1 - alpha(t))`` (1/t for loglinear)."""
        if self.name == "loglinear":
            return 1 / t  # the closed form; avoids cancellation in 1 - alpha(t) for small t
        return -self.alpha_prime(t) / (1 - self.alpha(t))


def make_schedule(cfg: DiffusionConfig) -> Schedule:
    return Schedule(cfg.schedule, cfg.eps)
