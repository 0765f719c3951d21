"""Metrics: exact ratios of float64 sums over several batches (not averages of per-batch ratios)."""

import torch

from ddsc.diffusion.masked_diffusion import DiffusionOutput
from ddsc.train.metrics import NELBO, MaskedAccuracy, MaskedAccuracyPM1, MaskedCE


def output(nelbo_sum, num_real, ce_sum, num_masked, correct, correct_pm1) -> DiffusionOutput:
    empty = torch.zeros(0)
    return DiffusionOutput(
        loss=torch.tensor(nelbo_sum / num_real),
        logits=empty,
        masked=empty.bool(),
        t=empty,
        nelbo_sum=torch.tensor(nelbo_sum, dtype=torch.float64),
        num_real=torch.tensor(num_real),
        ce_sum=torch.tensor(ce_sum, dtype=torch.float64),
        num_masked=torch.tensor(num_masked),
        correct=torch.tensor(correct),
        correct_pm1=torch.tensor(correct_pm1),
    )


def test_metrics_are_ratios_of_sums():
    batches = [output(10.0, 100, 3.0, 4, 1, 3), output(1e-9, 1, 1e8, 1000, 900, 1000)]
    metrics = {"nelbo": NELBO(), "ce": MaskedCE(), "acc": MaskedAccuracy(), "pm1": MaskedAccuracyPM1()}
    for out in batches:
        for metric in metrics.values():
            metric.update(out)
    values = {name: metric.compute() for name, metric in metrics.items()}
    assert all(v.dtype == torch.float64 for v in values.values())
    assert values["nelbo"].item() == (10.0 + 1e-9) / 101  # float64: the 1e-9 survives next to 10
    assert values["ce"].item() == (3.0 + 1e8) / 1004
    assert values["acc"].item() == 901 / 1004 and values["pm1"].item() == 1003 / 1004
    metrics["acc"].reset()
    metrics["acc"].update(batches[0])
    assert metrics["acc"].compute().item() == 0.25
