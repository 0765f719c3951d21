"""Sampling preview: every ``interval`` batches, generate a few cells and log how they compare to real ones.

The training loss says how well the model denoises one step; it does not say whether whole generated cells
look like cells. This callback samples the expression bins of a fixed set of held-out cells (their gene panels
and conditions, all positions generated) with ``ddsc.diffusion.samplers.sample`` and logs:

- ``preview/mean_bin``, ``preview/real_mean_bin``: the mean bin of the generated and of the real cells;
- ``preview/bin_tv``: total-variation distance between the two bin histograms, ``0.5 * sum_k |p_k - q_k|``
  (0: same distribution of bins, 1: disjoint).

The cells and the sampler's random numbers are fixed (``seed + batch``), so successive previews differ only
through the weights. Every rank samples (under FSDP the forward pass is a collective); rank 0 logs.
"""

from __future__ import annotations

import torch
from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from torch import Tensor

from ddsc.diffusion.config import DiffusionConfig
from ddsc.diffusion.sampler_names import Method
from ddsc.diffusion.samplers import sample

PREVIEW_KEYS = ("gene_ids", "expr", "real", "attention_mask", "cond")


def bin_histogram(expr: Tensor, real: Tensor, num_bins: int) -> Tensor:
    """Share of real positions in each bin, float64 [num_bins]."""
    counts = torch.bincount(expr[real], minlength=num_bins)[:num_bins].double()
    return counts / counts.sum().clamp(min=1)


def preview_metrics(generated: Tensor, real_expr: Tensor, real: Tensor, num_bins: int) -> dict[str, float]:
    """Mean bins and histogram TV distance of generated vs real bins over the ``real`` positions."""
    p, q = bin_histogram(generated, real, num_bins), bin_histogram(real_expr, real, num_bins)
    return {
        "preview/mean_bin": float(generated[real].double().mean()),
        "preview/real_mean_bin": float(real_expr[real].double().mean()),
        "preview/bin_tv": float(0.5 * (p - q).abs().sum()),
    }


class SamplingPreview(Callback):
    """``batch`` is a collated batch of held-out cells (``CellCollator`` output); ``interval`` like ``"500ba"``."""

    def __init__(
        self,
        interval: str,
        batch: dict[str, Tensor],
        diffusion: DiffusionConfig,
        method: Method = "first_hitting",
        steps: int = 16,
        seed: int = 0,
    ):
        time = Time.from_timestring(interval)
        if time.unit != TimeUnit.BATCH or time.value < 1:
            raise ValueError(f"trainer.preview_interval: expected a number of batches (e.g. '500ba'), got {interval!r}")
        self.every = int(time.value)
        self.batch = {k: batch[k] for k in PREVIEW_KEYS if k in batch}
        self.diffusion, self.method, self.steps, self.seed = diffusion, method, steps, seed

    def generate(self, dit: torch.nn.Module, step: int) -> dict[str, float]:
        """Sample the preview cells with ``dit`` (fp32) using the draws of batch ``step``; return the metrics."""
        device = next(dit.parameters()).device
        batch = {k: v.to(device) for k, v in self.batch.items()}
        generator = torch.Generator(device=device).manual_seed(self.seed + step)
        out = sample(dit, batch, method=self.method, steps=self.steps, generator=generator, diffusion=self.diffusion)
        return preview_metrics(out.expr.cpu(), self.batch["expr"], self.batch["real"], dit.cfg.num_bins)

    def batch_end(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        if step % self.every:
            return
        model = state.model.module if hasattr(state.model, "module") else state.model
        metrics = self.generate(model.model, step)
        if dist.get_global_rank() == 0:
            logger.log_metrics(metrics)
