"""Rectified flow (flow matching on straight paths) over latent tokens, with classifier-free guidance.

Method. ``x_t = (1 - t) x0 + t eps`` with ``eps ~ N(0, I)``, ``t in [0, 1]``; the model predicts the velocity
``v = dx_t/dt = eps - x0`` and the loss is its mean squared error. Sampling integrates ``dx/dt = v`` from
``t = 1`` (noise) to ``t = 0`` with Euler steps.

Why this and not a VP (DDPM) diffusion: it is the simplest continuous objective (no noise schedule, no
alpha/sigma bookkeeping, one regression target), the straight paths make a plain Euler sampler good with tens
of steps, and it is what SD3 and recent latent-diffusion work found at least as good as VP-epsilon
prediction. A perfect denoiser has zero loss (tested), which makes the objective easy to check.

Guidance. The conditional dropout of training is the DiT's own (each condition of ``model.conditions`` is
replaced by its learned null with its ``dropout`` probability in training mode, ``DiT.condition``). At
sampling, ``v = v_uncond + w (v_cond - v_uncond)``: ``w = 0`` is the unconditional model and ``w = 1`` the
conditional one. Those two are computed with one forward pass each and no arithmetic, so they are exactly the
plain models' samples; other ``w`` run both branches in one batch of ``2B``. The unconditional input is an
all-zero ``cond`` (every condition's null, ``ddsc.model.conditions``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ddsc.latent.config import LatentDiTConfig

# model(x_t [B, m, d], t [B], cond [B, W] or None) -> predicted velocity [B, m, d]
VelocityModel = Callable[[Tensor, Tensor, Tensor | None], Tensor]


@dataclass
class FlowOutput:
    loss: Tensor  # mean over cells of the per-value squared velocity error
    sq_err_sum: Tensor  # summed over every latent value of the batch, for an exact metric ratio
    num_values: Tensor


class RectifiedFlow:
    """The objective and the sampler; holds only the config (the model is passed in)."""

    def __init__(self, cfg: LatentDiTConfig):
        self.cfg = cfg

    def sample_time(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """Diffusion times [n] in [0, 1] (``latent_dit.time_sampling``), float32."""
        if self.cfg.time_sampling == "logit_normal":
            normal = torch.randn(n, device=device, generator=generator)
            return torch.sigmoid(self.cfg.logit_normal_mean + self.cfg.logit_normal_std * normal)
        u = torch.rand((), device=device, generator=generator)
        return (u + torch.arange(n, device=device) / n) % 1.0  # stratified: one per 1/n of [0, 1]

    def loss(
        self,
        model: VelocityModel,
        x0: Tensor,
        cond: Tensor | None = None,
        generator: torch.Generator | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> FlowOutput:
        """The flow-matching loss of clean latents ``x0`` [B, m, d] (``t`` / ``noise`` fixed for tests)."""
        x0 = x0.float()
        if t is None:
            t = self.sample_time(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        x_t = torch.lerp(x0, noise, t[:, None, None])  # (1 - t) x0 + t eps
        error = (model(x_t, t, cond).float() - (noise - x0)).square()
        return FlowOutput(
            error.mean(dim=(1, 2)).mean(), error.detach().sum(), torch.tensor(error.numel(), device=x0.device)
        )

    @torch.no_grad()
    def velocity(self, model: VelocityModel, x: Tensor, t: Tensor, cond: Tensor | None, w: float) -> Tensor:
        """The guided velocity (see the module docstring); no conditions at all: the model's own velocity."""
        if cond is None or w == 1.0:
            return model(x, t, cond).float()
        null = torch.zeros_like(cond)
        if w == 0.0:
            return model(x, t, null).float()
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null])).float().chunk(2)
        return v_uncond + w * (v_cond - v_uncond)

    @torch.no_grad()
    def sample(
        self,
        model: VelocityModel,
        noise: Tensor,
        cond: Tensor | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> Tensor:
        """Euler integration from ``noise`` [B, m, d] at t = 1 to latents at t = 0 (float32).

        The noise fixes the device and the randomness: draw it with ``initial_noise`` and a seeded generator
        for a reproducible sample (the sampler itself draws nothing).
        """
        steps = steps or self.cfg.sampler_steps
        w = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        times = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
        x = noise.float()
        for t, t_next in zip(times[:-1], times[1:], strict=True):
            x = x + (t_next - t) * self.velocity(model, x, t.expand(x.shape[0]), cond, w)
        return x


def initial_noise(
    n: int, shape: tuple[int, int], generator: torch.Generator | None = None, device: torch.device | None = None
) -> Tensor:
    """``N(0, I)`` [n, m, d] on the generator's device (or ``device``): the start of ``RectifiedFlow.sample``."""
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn((n, *shape), generator=generator, device=device)
