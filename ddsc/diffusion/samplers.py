"""Generation by reversing the masked diffusion: de novo cells, inpainting / imputation, guided sampling.

Every sampler starts from the batch with the positions to generate masked (observed positions keep their
bins and are never touched: inpainting), asks the denoiser for p(x0 | x_t) and unmasks tokens by drawing from
it. Draws are Gumbel-max in float64: float32 Gumbel noise saturates in the tail and lowers the effective
temperature (Zheng et al. 2024).

- ``ancestral``: MDLM's reverse process on the grid ``1 = t_0 > ... > t_steps = 0``. From t to s each masked
  token is unmasked with probability ``(alpha_s - alpha_t) / (1 - alpha_t)`` and takes a bin drawn from
  p(x0 | x_t). Tokens unmasked in the same step are drawn independently, so it is exact as steps -> infinity
  (log-linear schedule, uniform grid: each token unmasks in a uniformly random step, two tokens share one
  with probability 1 / steps). Prediction caching (MDLM ``ddpm_cache``), per cell: a cell's denoiser output is
  reused while none of its tokens changes, so most of many small steps cost nothing. Exact for a
  time-independent denoiser (the default, ``time_conditioning: false``); switched off otherwise.
- ``first_hitting``: unmasks ``ceil(masked / steps left)`` tokens per step, chosen uniformly at random. A
  masked diffusion with a time-independent denoiser unmasks tokens in a uniformly random order whatever the
  schedule, so with ``steps`` >= the number of generated positions this is exact (the first-hitting sampler);
  with fewer steps it commits several conditionally independent draws at once, for ``steps`` evaluations.
- ``confidence``: like ``first_hitting`` but commits the draws the model is most confident about (highest
  probability of the drawn bin), MaskGIT-style. Not exact, usually better at very few steps.

Classifier-free guidance: ``log p = log p_uncond + s * (log p_cond - log p_uncond)`` with the null label
(id 0) for every condition in the unconditional pass; ``s = 1`` is plain conditional sampling and ``s = 0``
unconditional. Cost: ``nfe`` counts denoiser forward calls, ``nfe_per_cell`` the network evaluations per
generated cell (a guided evaluation is two; a cached cell costs nothing).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ddsc.data.tokens import ExpressionTokens
from ddsc.diffusion.config import DiffusionConfig
from ddsc.diffusion.sampler_names import METHODS, Method
from ddsc.diffusion.schedule import Schedule, make_schedule


@dataclass
class SampleOutput:
    expr: Tensor  # int64 [B, L]: generated bins at the generated positions, the input elsewhere
    nfe: int  # denoiser forward calls
    nfe_per_cell: float  # network evaluations per cell (cells evaluated, summed over calls, / B)
    trajectory: list[Tensor] | None  # the state after every step (first: the start), if asked for


@contextmanager
def _evaluation(model: nn.Module):
    """Eval mode (no condition dropout, no dropout) and no autograd, restoring the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _model_config(model: nn.Module):
    return getattr(model, "cfg", None) or getattr(model, "config", None)


def guided_log_probs(
    model: nn.Module,
    batch: dict[str, Tensor],
    expr: Tensor,
    t: Tensor,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
) -> tuple[Tensor, int]:
    """float64 log p(x0 | expr) [B, L, K] after guidance and temperature, and the number of forward passes."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    cond = batch.get("cond")

    def log_probs(condition: Tensor | None) -> Tensor:
        logits = model(batch["gene_ids"], expr, batch["attention_mask"], condition, t)
        return logits.double().log_softmax(dim=-1)

    if cond is None or cond.shape[1] == 0 or guidance_scale == 1.0:
        guided, passes = log_probs(cond), 1
    elif guidance_scale == 0.0:
        guided, passes = log_probs(torch.zeros_like(cond)), 1
    else:
        uncond = log_probs(torch.zeros_like(cond))
        guided, passes = uncond + guidance_scale * (log_probs(cond) - uncond), 2
    return (guided / temperature).log_softmax(dim=-1), passes


def gumbel_argmax(log_probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One categorical draw per position from float64 log-probabilities (Gumbel-max in float64)."""
    u = torch.rand(log_probs.shape, dtype=torch.float64, device=log_probs.device, generator=generator)
    tiny = torch.finfo(torch.float64).tiny
    return (log_probs.double() - torch.log(-torch.log(u.clamp(min=tiny)))).argmax(dim=-1)


class _Denoiser:
    """The guided, tempered denoiser on a subset of the batch's cells, counting what it costs."""

    def __init__(self, model: nn.Module, batch: dict[str, Tensor], guidance_scale: float, temperature: float):
        self.model, self.batch = model, batch
        self.guidance_scale, self.temperature = guidance_scale, temperature
        self.calls = 0
        self.cell_evaluations = 0

    def __call__(self, rows: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """log p(x0 | x) float64 [len(rows), L, K] for the cells ``rows`` in state ``x`` at times ``t``."""
        sub = {key: self.batch[key][rows] for key in ("gene_ids", "attention_mask", "cond") if key in self.batch}
        log_probs, passes = guided_log_probs(self.model, sub, x, t, self.guidance_scale, self.temperature)
        self.calls += passes
        self.cell_evaluations += passes * len(rows)
        return log_probs


def sample(
    model: nn.Module,
    batch: dict[str, Tensor],
    *,
    method: Method = "ancestral",
    steps: int,
    temperature: float = 1.0,
    guidance_scale: float = 1.0,
    observed: Tensor | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    diffusion: DiffusionConfig | None = None,
) -> SampleOutput:
    """Generate bins at ``batch["real"] & ~observed`` positions (all real positions when ``observed`` is None).

    ``batch`` is a collator-style dict (``gene_ids``, ``attention_mask``, ``real``, ``cond``, and ``expr``
    holding the observed bins). ``diffusion`` gives the schedule (default: MDLM's log-linear, eps = 1e-3): the
    ancestral sampler's unmasking probabilities, and for every sampler the t a time-conditioned model is given. ``model`` is a DiT (anything with its forward signature and a ``cfg``/``config``
    carrying ``num_bins``).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    config = _model_config(model)
    tokens = ExpressionTokens(config.num_bins)
    real = batch["real"]
    generate = real if observed is None else real & ~observed
    if observed is not None and (batch["expr"][observed & real] >= tokens.num_bins).any():
        raise ValueError("observed positions must hold expression bins (not mask / pad / cls tokens)")
    x = batch["expr"].masked_fill(generate, tokens.mask)
    denoise = _Denoiser(model, batch, guidance_scale, temperature)
    schedule = make_schedule(diffusion or DiffusionConfig())
    if method == "ancestral":
        cache = not getattr(config, "time_conditioning", False)
        step = _ancestral_step(denoise, tokens, schedule, steps, len(x), cache)
    elif method in ("first_hitting", "confidence"):
        step = _ordered_step(denoise, tokens, schedule, generate, steps, by_confidence=method == "confidence")
    else:
        raise ValueError(f"unknown sampling method {method!r} ({', '.join(METHODS)})")
    trajectory = [x.clone()] if return_trajectory else None
    with _evaluation(model):
        for i in range(steps):
            x = step(i, x, generator)
            if trajectory is not None:
                trajectory.append(x.clone())
    return SampleOutput(
        expr=x, nfe=denoise.calls, nfe_per_cell=denoise.cell_evaluations / max(len(x), 1), trajectory=trajectory
    )


def _ancestral_step(
    denoise: _Denoiser, tokens: ExpressionTokens, schedule: Schedule, steps: int, batch_size: int, cache: bool
):
    """Step function of the reverse process, with per-cell prediction caching when ``cache``."""
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    alphas = schedule.alpha(times)
    alphas[-1] = 1.0  # t = 0: everything still masked is unmasked in the last step
    predictions: Tensor | None = None  # [B, L, K] float64, allocated at the first evaluation
    stale = torch.ones(batch_size, dtype=torch.bool)

    def step(i: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
        nonlocal predictions
        masked = x == tokens.mask
        active = masked.any(dim=1)
        todo = (stale.to(x.device) & active) if cache else active
        if todo.any():
            rows = todo.nonzero().squeeze(1)
            log_probs = denoise(rows, x[rows], torch.full((len(rows),), float(times[i]), device=x.device))
            if predictions is None:
                predictions = log_probs.new_zeros(*x.shape, log_probs.shape[-1])
            predictions[rows] = log_probs
            stale[rows.cpu()] = False
        p_unmask = float((alphas[i + 1] - alphas[i]) / (1 - alphas[i]))
        draw = torch.rand(x.shape, dtype=torch.float64, device=x.device, generator=generator)
        unmask = masked & (draw < p_unmask)
        x = x.clone()
        x[unmask] = gumbel_argmax(predictions[unmask], generator)  # draw only where a token is unmasked
        stale.logical_or_(unmask.any(dim=1).cpu())
        return x

    return step


def _ordered_step(
    denoise: _Denoiser, tokens: ExpressionTokens, schedule: Schedule, generate: Tensor, steps: int, by_confidence: bool
):
    """Step function that commits ``ceil(masked / steps left)`` tokens of each cell per step."""
    total = generate.sum(dim=1).clamp(min=1)

    def step(i: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
        masked = x == tokens.mask
        remaining = masked.sum(dim=1)
        rows = (remaining > 0).nonzero().squeeze(1)
        if not len(rows):
            return x
        masked, remaining, current = masked[rows], remaining[rows], x[rows]
        # For a time-conditioned denoiser: the time at which the schedule masks this fraction of the tokens.
        log_probs = denoise(rows, current, schedule.time_of(remaining.double() / total[rows]).float())
        drawn = gumbel_argmax(log_probs, generator)
        if by_confidence:
            score = log_probs.gather(-1, drawn[..., None]).squeeze(-1)
        else:
            score = torch.rand(current.shape, dtype=torch.float64, device=x.device, generator=generator)
        rank = score.masked_fill(~masked, -math.inf).argsort(dim=1, descending=True).argsort(dim=1)
        commit = masked & (rank < torch.ceil(remaining / (steps - i)).long()[:, None])
        x = x.clone()
        x[rows] = torch.where(commit, drawn, current)
        return x

    return step
