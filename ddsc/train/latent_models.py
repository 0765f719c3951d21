"""The latent family as Composer models: the cell VAE, and the flow DiT over a frozen VAE's latents.

Both take the same collator batches as ``DDSCComposerModel`` (``gene_ids``, ``counts``, ``real``,
``attention_mask``, ``cond``), so the Streaming data, the loaders, both engines' loops, the callbacks and the
checkpoints work unchanged. Evaluation draws its noise (posterior samples, t, the flow's noise) from a generator
seeded per batch, as the masked family does, so successive evaluations score the same noise.

Metrics (exact ratios of float64 sums over the evaluation set and ranks):

- ``nb_nll``: the VAE's negative-binomial NLL per real gene (nats), at one posterior sample per cell;
- ``kl``: KL(q(z|x) || N(0, I)) per cell (nats), summed over the ``m * d`` latent values;
- ``flow_mse``: the latent DiT's squared velocity error per latent value (the flow-matching loss).

The latent DiT's VAE is frozen: no gradients, eval mode whatever Composer asks (``train`` is overridden), and
its weights ride along in the DiT's checkpoints, so a checkpoint is self-contained. The latent scale
(``latent_std``) is a buffer, saved too: fixed by ``latent_dit.latent_std`` or estimated once, on the first
batch (averaged over ranks), and kept for the rest of the run and across resumes.

Library sizes. The VAE decodes rates that are shares of the library it was given, the sum of the counts the
collator kept (at most ``max_length`` genes of a cell), so generating counts needs libraries of that kind. The
DiT wrapper keeps a histogram of the log libraries of its training batches (``library_counts``, a buffer in
the checkpoint; bins of ``LOG_LIBRARY_RANGE``), which the HF export ships (``ddsc.latent.hf``): the training
distribution as the model saw it, with no pass over the data at export time. With several ranks each rank
counts its own batches and the checkpoint keeps rank 0's histogram (DDP broadcasts rank 0's buffers; monolithic
and sharded checkpoints store replicated buffers once): a random sample of the training batches, which is what
generation needs.

Precision. Under FSDP2 mixed precision (GPU, ``amp_bf16``) the root module's floating-point inputs are cast
to bf16, the collator's float32 ``counts`` included, so counts above 256 reach the VAE's NB likelihood rounded
to bf16's 3 significant digits (a count of 1001 becomes 1000). Rare in UMI data and small in log-likelihood,
but not exact; DDP, the CPU paths and the latent DiT (counts are only an encoder input there) are unaffected.
The exact fix is integer counts in the batch, a collator change.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml
from composer.models import ComposerModel
from composer.utils import dist
from torch import Tensor

from ddsc.config import ConfigError, from_dict
from ddsc.latent.config import LatentDiTConfig, LatentVAEConfig
from ddsc.latent.flow import FlowOutput, RectifiedFlow
from ddsc.latent.latent_dit import LatentDiT
from ddsc.latent.vae import LatentVAE, VAEOutput, log_library
from ddsc.model.config import ConditionConfig
from ddsc.precision import autocast
from ddsc.train.checkpoints import find_run_config, read_model_state
from ddsc.train.composer_model import SeededEvalModel
from ddsc.train.config import RunConfig
from ddsc.train.metrics import _RatioMetric

LOG_LIBRARY_RANGE = (0.0, 16.0)  # log counts: 1 to 8.9 million
LOG_LIBRARY_BINS = 320  # 0.05 wide: 5% steps of the library


class NBNLLPerGene(_RatioMetric):
    higher_is_better = False

    def _parts(self, out: VAEOutput) -> tuple[Tensor, Tensor]:
        return out.nll_sum, out.num_genes


class KLPerCell(_RatioMetric):
    higher_is_better = False

    def _parts(self, out: VAEOutput) -> tuple[Tensor, Tensor]:
        return out.kl_sum, out.num_cells


class FlowMSE(_RatioMetric):
    higher_is_better = False

    def _parts(self, out: FlowOutput) -> tuple[Tensor, Tensor]:
        return out.sq_err_sum, out.num_values


class LatentVAEComposerModel(SeededEvalModel):
    """``model`` is the ``LatentVAE``; the loss is NB NLL + beta KL per cell (``LatentVAE.loss``)."""

    def __init__(self, cfg: LatentVAEConfig, gene_vocab_size: int, autocast_dtype: torch.dtype | None = None):
        super().__init__(autocast_dtype, {"nb_nll": NBNLLPerGene, "kl": KLPerCell})
        self.model = LatentVAE(cfg, gene_vocab_size)

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> VAEOutput:
        with autocast(batch["gene_ids"].device.type, self.autocast_dtype):
            return self.model(batch, generator=generator)  # through __call__: FSDP's hooks gather the weights


class LatentDiTComposerModel(SeededEvalModel):
    """``model`` is the ``LatentDiT`` (trained); ``vae`` the frozen VAE that encodes each batch on the fly."""

    def __init__(
        self,
        cfg: LatentDiTConfig,
        vae: LatentVAE,
        conditions: list[ConditionConfig],
        autocast_dtype: torch.dtype | None = None,
    ):
        super().__init__(autocast_dtype, {"flow_mse": FlowMSE})
        self.cfg = cfg
        self.model = LatentDiT(cfg, vae.cfg.n_latents, vae.cfg.d_latent, conditions)
        self.vae = vae.requires_grad_(False).eval()
        self.flow = RectifiedFlow(cfg)
        self.register_buffer("latent_std", torch.tensor(cfg.latent_std or 0.0))  # 0: not estimated yet
        self.register_buffer("library_counts", torch.zeros(LOG_LIBRARY_BINS, dtype=torch.float64))

    def train(self, mode: bool = True) -> LatentDiTComposerModel:
        super().train(mode)
        self.vae.eval()  # frozen: never dropout, whatever the trainer asks
        return self

    @torch.no_grad()
    def latents(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        """The batch's cells as scaled latents ``[B, m, d]`` float32 (posterior means, or samples)."""
        posterior = self.vae(batch, encode_only=True)  # through __call__, for FSDP (``LatentVAE.forward``)
        z = posterior.sample(generator) if self.cfg.latent_sample else posterior.mean
        if float(self.latent_std) == 0.0:
            self.latent_std.fill_(estimate_std(z))
        return z.float() / self.latent_std

    @torch.no_grad()
    def count_libraries(self, batch: dict) -> None:
        """Add the batch's log library sizes (as the VAE decodes with them) to ``library_counts``."""
        low, high = LOG_LIBRARY_RANGE
        log_lib = log_library(batch["counts"], batch["real"]).double().clamp(low, high - 1e-9)
        index = ((log_lib - low) / (high - low) * LOG_LIBRARY_BINS).long()
        self.library_counts.index_add_(0, index, torch.ones_like(log_lib))

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> FlowOutput:
        if self.training:
            self.count_libraries(batch)
        with autocast(batch["gene_ids"].device.type, self.autocast_dtype):
            x0 = self.latents(batch, generator)
            return self.flow.loss(self.model, x0, batch["cond"], generator=generator)

    def flops_per_batch(self, batch: dict) -> float:
        """The DiT's training FLOPs (the frozen VAE's encoding is not model FLOPs of this run)."""
        return float(self.model.flops_per_cell() * batch["gene_ids"].shape[0])


def estimate_std(z: Tensor) -> float:
    """The standard deviation of every latent value of a batch, averaged over ranks (one scale for the run)."""
    second = torch.stack([z.float().square().mean(), z.float().mean()]).double()
    if dist.get_world_size() > 1:
        dist.all_reduce(second)
        second /= dist.get_world_size()
    variance = float(second[0] - second[1] ** 2)
    if not math.isfinite(variance) or variance <= 0:
        raise ValueError(f"latent_dit.latent_std: the first batch's latents have variance {variance}; set it")
    return math.sqrt(variance)


def read_vae_run(path: str) -> RunConfig:
    """The VAE run's resolved config (``config.yaml`` in or above ``latent_dit.vae``), checked to be a VAE run."""
    if not path:
        raise ConfigError("latent_dit.vae: family latent_dit needs the VAE run (its save folder or checkpoint)")
    if not Path(path).exists():
        raise ConfigError(f"latent_dit.vae: {path} not found (train the VAE first: family latent_vae)")
    found = find_run_config(path)
    if found is None:
        raise ConfigError(f"latent_dit.vae: no config.yaml in or above {path} (the VAE run's save folder has one)")
    try:
        run = from_dict(RunConfig, yaml.safe_load(found.read_text()))
    except ConfigError as err:
        raise ConfigError(f"latent_dit.vae: {found}: {err}") from None
    if run.family != "latent_vae":
        raise ConfigError(f"latent_dit.vae: {found} is a '{run.family}' run, not a latent_vae run")
    return run


def load_vae(path: str, cfg: LatentVAEConfig, gene_vocab_size: int) -> LatentVAE:
    """The trained VAE from any checkpoint kind of the VAE run (``ddsc.train.checkpoints``), float32."""
    vae = LatentVAE(cfg, gene_vocab_size)
    try:
        vae.load_state_dict(read_model_state(path))
    except RuntimeError as err:
        raise ConfigError(f"latent_dit.vae: {path} does not fit latent_vae of its config.yaml: {err}") from None
    return vae


def build_latent_model(config: RunConfig, autocast_dtype: torch.dtype | None) -> ComposerModel:
    """The Composer model of a resolved latent-family run (``latent_vae`` was filled from the VAE run)."""
    if config.family == "latent_vae":
        return LatentVAEComposerModel(config.latent_vae, config.model.gene_vocab_size, autocast_dtype)
    vae = load_vae(config.latent_dit.vae, config.latent_vae, config.model.gene_vocab_size)
    return LatentDiTComposerModel(config.latent_dit, vae, config.model.conditions, autocast_dtype)
