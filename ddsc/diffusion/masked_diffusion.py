"""MDLM (Sahoo et al. 2024) on expression tokens: forward masking and the continuous-time NELBO.

Forward process: each *real* gene position keeps its clean bin with probability alpha(t) and becomes the mask
token otherwise (``<cls>`` and padding are never masked). The denoiser sees the gene ids, the partly masked
bins and the cell conditions, and predicts a distribution over the K bins at every position.

SUBS parameterisation: the mask is never predicted and an unmasked position is copied through, so its
contribution to the ELBO is exactly zero; only masked positions carry loss. The continuous-time NELBO of a
cell is ``E_t [ weight(t) * sum over masked positions of CE(logits, x0) ]`` with
``weight(t) = -alpha'(t) / (1 - alpha(t))`` (1/t for the log-linear schedule). We report it per real gene
position (nats), the quantity the original DDSC reported as "NLL".

Variance reduction: antithetic (stratified) t across the batch, ``t_i = (u + i / B) mod 1``, mapped to
``[eps, 1]`` so the 1/t weight stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ddsc.data.tokens import ExpressionTokens
from ddsc.diffusion.config import DiffusionConfig
from ddsc.diffusion.schedule import make_schedule

# model(gene_ids, expr, attention_mask, cond, t) -> logits [B, L, K]; a DiT or anything with its signature.
Denoiser = Callable[..., Tensor]


@dataclass
class DiffusionOutput:
    """One loss evaluation. ``loss`` is differentiable; the sums are detached, for metrics."""

    loss: Tensor  # scalar: NELBO per real token (what is backpropagated)
    logits: Tensor  # float32 [B, L, K]
    masked: Tensor  # bool [B, L]
    t: Tensor  # float [B]
    nelbo_sum: Tensor  # float64: sum over masked positions of weight(t) * CE
    num_real: Tensor  # int64: real gene positions
    ce_sum: Tensor  # float64: sum over masked positions of CE (unweighted)
    num_masked: Tensor  # int64
    correct: Tensor  # int64: masked positions whose argmax bin is the clean bin
    correct_pm1: Tensor  # int64: ... within one bin of the clean bin


class MaskedDiffusion:
    """The whole training-side method: ``sample_t`` -> ``corrupt`` -> denoiser -> ``loss``."""

    def __init__(self, cfg: DiffusionConfig, num_bins: int):
        self.cfg = cfg
        self.schedule = make_schedule(cfg)
        self.tokens = ExpressionTokens(num_bins)
        self.num_bins = num_bins

    def sample_t(self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
        """Diffusion times in ``[eps, 1]``, float32 [B]; stratified over the batch when ``cfg.antithetic``."""
        if self.cfg.antithetic:
            u = torch.rand(1, device=device, generator=generator)
            t = (u + torch.arange(batch_size, device=device) / batch_size) % 1
        else:
            t = torch.rand(batch_size, device=device, generator=generator)
        return self.cfg.eps + (1 - self.cfg.eps) * t

    def corrupt(
        self, expr: Tensor, real: Tensor, t: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Mask each real position independently with probability 1 - alpha(t): (noisy expr, masked)."""
        p_mask = 1 - self.schedule.alpha(t)
        draw = torch.rand(expr.shape, device=expr.device, generator=generator)
        masked = real & (draw < p_mask[:, None])
        return expr.masked_fill(masked, self.tokens.mask), masked

    def loss(
        self,
        model: Denoiser,
        batch: dict[str, Tensor],
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DiffusionOutput:
        expr, real = batch["expr"], batch["real"]
        if t is None:
            t = self.sample_t(expr.shape[0], expr.device, generator)
        noisy, masked = self.corrupt(expr, real, t, generator)
        logits = model(batch["gene_ids"], noisy, batch["attention_mask"], batch.get("cond"), t)
        log_probs = logits.float().log_softmax(dim=-1)
        target = expr.clamp(max=self.num_bins - 1)  # special tokens only occur where nothing is masked
        ce = -log_probs.gather(-1, target[..., None]).squeeze(-1)
        ce = torch.where(masked, ce, torch.zeros_like(ce))
        nelbo_sum = (self.schedule.weight(t.float())[:, None] * ce).sum()
        num_real = real.sum()
        loss = nelbo_sum / num_real.clamp(min=1)
        with torch.no_grad():
            prediction = logits.argmax(dim=-1)
            distance = (prediction - target).abs()
            return DiffusionOutput(
                loss=loss,
                logits=logits,
                masked=masked,
                t=t,
                nelbo_sum=nelbo_sum.detach().double(),
                num_real=num_real,
                ce_sum=ce.detach().double().sum(),
                num_masked=masked.sum(),
                correct=((distance == 0) & masked).sum(),
                correct_pm1=((distance <= 1) & masked).sum(),
            )
