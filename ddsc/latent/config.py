"""Typed configuration of the latent-diffusion family: the cell VAE and the DiT over its latent tokens.

Like ``ddsc.model.config``: plain dataclasses whose ``__post_init__`` rejects impossible values with a
``ConfigError`` naming the key (the loader adds the section, ``latent_vae.`` / ``latent_dit.``). What the two
share with the masked family stays where it is: the gene vocabulary size and the cell-level conditions are
``model.gene_vocab_size`` and ``model.conditions`` of the run (the collator and the label vocabulary read them
there), so one data section feeds every family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ddsc.errors import ConfigError


def _check_positive(section: object, *names: str) -> None:
    for name in names:
        if getattr(section, name) <= 0:
            raise ConfigError(f"{name}: must be positive, got {getattr(section, name)}")


@dataclass
class LatentVAEConfig:
    """A set encoder from a cell's (gene, count) pairs to ``n_latents`` tokens of ``d_latent`` values, and a
    negative-binomial decoder from those tokens to any queried genes' counts (``ddsc.latent.vae``).

    ``beta`` weights the KL term against the NB log-likelihood summed over a cell's genes. It is small by
    default because the latents are for a diffusion model, not for a prior draw: they must keep the cell's
    detail (low reconstruction error) while the KL only keeps their scale and smoothness in check (the latent
    DiT rescales them to unit variance anyway). Measured on the demo data after 300 batches: ``beta = 0.1``
    collapsed the posterior to the prior (KL ~2 nats per cell, and decoding its means was worse than decoding
    zeros), ``1e-3`` kept the latents informative (decoding the means beat decoding zeros or another cell's). ``init_log_rate`` is the initial log share of the library
    for every gene (about ``-log(genes per cell)``), so that the first steps do not predict a whole
    library for each gene.
    """

    n_latents: int = 16  # m latent tokens per cell
    d_latent: int = 16  # d values per latent token
    d_model: int = 256
    n_heads: int = 4
    encoder_layers: int = 2  # self-attention blocks over the m latents, after the cross-attention over genes
    decoder_layers: int = 2  # cross-attention blocks from the queried genes to the latents
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    beta: float = 1e-3
    zero_inflated: bool = False
    init_log_rate: float = -7.0
    logvar_min: float = -12.0  # clamp of the posterior log-variance: exp(-12) is far below any useful noise
    logvar_max: float = 6.0

    def __post_init__(self) -> None:
        _check_positive(self, "n_latents", "d_latent", "d_model", "n_heads", "encoder_layers", "decoder_layers")
        _check_positive(self, "mlp_ratio")
        if self.d_model % self.n_heads:
            raise ConfigError(f"n_heads: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.beta < 0:
            raise ConfigError(f"beta: must be >= 0, got {self.beta}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.logvar_min >= self.logvar_max:
            raise ConfigError(f"logvar_min: must be below logvar_max={self.logvar_max}, got {self.logvar_min}")


@dataclass
class LatentDiTConfig:
    """A DiT over the VAE's latent tokens, trained by rectified flow (``ddsc.latent.flow``).

    ``vae``: the VAE run to encode cells with, a Composer save folder (its newest checkpoint and the
    ``config.yaml`` beside it) or one checkpoint file in it; required for ``family: latent_dit``.
    ``latent_std``: the scale dividing the latents so that the flow sees unit variance; ``None`` estimates
    it from the first training batch (and the checkpoint keeps it). ``time_sampling``: ``uniform`` draws
    stratified t (one stratum per cell, as the masked family's antithetic t), ``logit_normal`` draws
    ``sigmoid(N(mean, std))``, which puts more steps at mid-range t where the velocity is hardest (SD3).
    ``sampler_steps`` / ``guidance_scale`` are the defaults of the Euler sampler.
    """

    vae: str = ""
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    latent_sample: bool = False  # encode to posterior samples instead of the posterior means
    latent_std: float | None = None
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    sampler_steps: int = 50
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        _check_positive(self, "d_model", "n_layers", "n_heads", "mlp_ratio", "sampler_steps", "logit_normal_std")
        if self.d_model % self.n_heads:
            raise ConfigError(f"n_heads: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.latent_std is not None and self.latent_std <= 0:
            raise ConfigError(f"latent_std: must be positive (or null: estimate it), got {self.latent_std}")
        if self.time_sampling not in ("uniform", "logit_normal"):
            raise ConfigError(f"time_sampling: must be 'uniform' or 'logit_normal', got {self.time_sampling!r}")
