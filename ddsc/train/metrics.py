"""Training / evaluation metrics of the masked diffusion, accumulated in float64 across batches and ranks.

Definitions (all from ``DiffusionOutput`` sums, so they are exact ratios over the whole evaluation set, not
averages of per-batch ratios):

- ``NELBO``: sum over masked positions of weight(t) * CE, divided by the number of real gene positions (nats
  per real token). A Monte Carlo estimate of the continuous-time negative ELBO per token; "NLL" in DDSC.
- ``MaskedCE``: mean cross-entropy (nats) of the clean bin over masked positions, unweighted.
- ``MaskedAccuracy``: fraction of masked positions whose argmax bin equals the clean bin.
- ``MaskedAccuracyPM1``: fraction of masked positions whose argmax bin is within one bin of the clean bin.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from ddsc.diffusion.masked_diffusion import DiffusionOutput


class _RatioMetric(Metric):
    """numerator / denominator, both float64 sums reduced across ranks."""

    full_state_update = False
    higher_is_better: bool | None = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("numerator", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("denominator", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _parts(self, out: DiffusionOutput) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def update(self, out: DiffusionOutput) -> None:
        numerator, denominator = self._parts(out)
        self.numerator += numerator.detach().to(self.numerator.device, torch.float64)
        self.denominator += denominator.detach().to(self.denominator.device, torch.float64)

    def compute(self) -> Tensor:
        return self.numerator / self.denominator.clamp(min=1.0)


class NELBO(_RatioMetric):
    higher_is_better = False

    def _parts(self, out: DiffusionOutput) -> tuple[Tensor, Tensor]:
        return out.nelbo_sum, out.num_real


class MaskedCE(_RatioMetric):
    higher_is_better = False

    def _parts(self, out: DiffusionOutput) -> tuple[Tensor, Tensor]:
        return out.ce_sum, out.num_masked


class MaskedAccuracy(_RatioMetric):
    higher_is_better = True

    def _parts(self, out: DiffusionOutput) -> tuple[Tensor, Tensor]:
        return out.correct, out.num_masked


class MaskedAccuracyPM1(_RatioMetric):
    higher_is_better = True

    def _parts(self, out: DiffusionOutput) -> tuple[Tensor, Tensor]:
        return out.correct_pm1, out.num_masked
