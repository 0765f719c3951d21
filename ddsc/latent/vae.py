"""A cell VAE: a set of (gene, count) pairs -> ``m`` latent tokens -> negative-binomial counts of any genes.

Encoder (a Perceiver-style set encoder). Each position is its gene-id embedding plus a small MLP of
``log1p(count)``; ``m`` learned queries, each plus the cell's expression-weighted sum of gene vectors
(``sum_g log1p(x_g) e_g``, layer-normed: scVI's first layer, for any gene panel), cross-attend over the
positions of the cell (``attention_mask``: the
real genes and ``<cls>``, which carries count 0 and is a constant key, so that a cell without genes still has
something to attend to), then ``encoder_layers`` self-attention blocks (the DiT's own ``DiTBlock`` with a zero
conditioning vector) mix the latents, and a linear map gives the posterior mean and log-variance
``[B, m, d]``. There is no positional encoding and attention sums over keys, so the latents do not depend on
the order of the genes (up to float rounding).

Decoder. Each queried gene id is an embedding plus an MLP of the cell's log library size; it cross-attends to
the ``m`` latent tokens (a linear map ``d -> d_model`` plus a learned embedding per latent slot: the slots are
ordered, unlike genes) through ``decoder_layers`` ``CrossBlock``s. The NB mean is **log-rate + log library**:
``log mu_g = b_g + r_g(z) + log L`` with a learned per-gene baseline ``b_g`` and the cell's library ``L``.
Chosen over scVI's softmax over the cell's genes because then a gene's prediction depends on the latents, the
library and the gene only, never on which other genes are queried: the decoder answers for any panel (a
subset for training, the whole vocabulary for generation) with the same meaning. The inverse dispersion is
one learned value per gene (scVI's ``dispersion="gene"``), the zero-inflation logit (``zero_inflated``) is
predicted per gene and cell.

Library. Training sees the collator's random ``max_length`` subset of a cell, and ``L`` is the sum of the
counts the batch holds (what the encoder saw), so the rates are shares of the observed counts. Any other
library (e.g. the full cell's total at generation) can be passed to ``decode``.

Loss (``VAE.loss``): ``-log NB`` summed over the real genes of a cell plus ``beta * KL(q(z|x) || N(0, I))``
summed over the ``m * d`` latent values, averaged over cells: the negative ELBO per cell when ``beta = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ddsc.latent.blocks import CrossBlock, Float32LayerNorm, compile_blocks, is_block, self_attention
from ddsc.latent.config import LatentVAEConfig
from ddsc.latent.nb import nb_log_prob_log_space
from ddsc.model.config import ModelConfig
from ddsc.model.dit import DiTBlock, Float32Linear, in_dtype_of, init_weights

LOG_THETA_RANGE = (-8.0, 12.0)  # inverse dispersion between 3e-4 and 1.6e5 (beyond: a Poisson)


@dataclass
class VAEOutput:
    """Sums for the metrics (exact ratios over an evaluation set) and the loss."""

    loss: Tensor  # mean over cells of (NB NLL summed over genes + beta * KL)
    nll_sum: Tensor  # NB negative log-likelihood summed over real genes, all cells
    kl_sum: Tensor  # KL summed over latent values, all cells
    num_genes: Tensor  # real gene positions
    num_cells: Tensor


@dataclass
class Posterior:
    mean: Tensor  # float32 [B, m, d]
    logvar: Tensor  # float32 [B, m, d]

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + (0.5 * self.logvar).exp() * noise

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per cell [B], summed over the latent values."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2))


@dataclass
class NBParams:
    """The decoder's per-gene distribution, in log space (``ddsc.latent.nb``); all float32 [B, G]."""

    log_mu: Tensor
    log_theta: Tensor
    zi_logits: Tensor | None

    def log_prob(self, counts: Tensor) -> Tensor:
        return nb_log_prob_log_space(counts, self.log_mu, self.log_theta, self.zi_logits)


def log_library(counts: Tensor, real: Tensor) -> Tensor:
    """log of each cell's observed counts [B] (at least 1, so an empty cell is finite)."""
    return torch.where(real, counts.float(), 0.0).sum(dim=1).clamp(min=1.0).log()


def scalar_mlp(d_model: int) -> nn.Sequential:
    """One number per position -> ``d_model`` (the count and library features)."""
    return nn.Sequential(nn.Linear(1, d_model), nn.SiLU(), nn.Linear(d_model, d_model))


class LatentVAE(nn.Module):
    """``encode(batch) -> Posterior``; ``decode(z, gene_ids, log_library) -> NBParams``; ``loss(batch)``
    (also ``forward``)."""

    def __init__(self, cfg: LatentVAEConfig, gene_vocab_size: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        block_cfg = ModelConfig(d_model=d, n_heads=cfg.n_heads, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout)
        # encoder
        self.gene_embedding = nn.Embedding(gene_vocab_size, d)
        self.count_mlp = scalar_mlp(d)
        self.queries = nn.Parameter(torch.zeros(cfg.n_latents, d))
        self.bag_embedding = nn.Embedding(gene_vocab_size, d)
        self.bag_norm = Float32LayerNorm(d, eps=1e-6)
        self.cross = CrossBlock(d, cfg.n_heads, cfg.mlp_ratio, cfg.dropout)
        self.blocks = nn.ModuleList(DiTBlock(block_cfg) for _ in range(cfg.encoder_layers))
        self.encoder_norm = Float32LayerNorm(d, eps=1e-6)
        self.posterior = Float32Linear(d, 2 * cfg.d_latent)
        # decoder
        self.latent_in = nn.Linear(cfg.d_latent, d)
        self.latent_position = nn.Embedding(cfg.n_latents, d)
        self.query_embedding = nn.Embedding(gene_vocab_size, d)
        self.library_mlp = scalar_mlp(d)
        self.decoder = nn.ModuleList(
            CrossBlock(d, cfg.n_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.decoder_layers)
        )
        self.decoder_norm = Float32LayerNorm(d, eps=1e-6)
        self.head = Float32Linear(d, 2 if cfg.zero_inflated else 1)  # log-rate offset (, zero-inflation logit)
        self.gene_log_rate = nn.Embedding(gene_vocab_size, 1)
        self.gene_log_theta = nn.Embedding(gene_vocab_size, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier linears, N(0, 0.02) embeddings and queries, zero adaLN maps (blocks start as the identity),
        a zero output head, so the first prediction is the per-gene baseline (``init_log_rate``, theta = 1,
        zero-inflation 5%)."""
        init_weights(self)
        nn.init.normal_(self.queries, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaln[-1].weight)
            nn.init.zeros_(block.adaln[-1].bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if self.cfg.zero_inflated:
            nn.init.constant_(self.head.bias[1:], -3.0)
        nn.init.constant_(self.gene_log_rate.weight, self.cfg.init_log_rate)
        nn.init.zeros_(self.gene_log_theta.weight)

    def encode(self, batch: dict[str, Tensor]) -> Posterior:
        """The posterior over ``[B, m, d]`` latents from ``gene_ids``, ``counts`` and ``attention_mask``."""
        gene_ids, counts, keys = batch["gene_ids"], batch["counts"], batch["attention_mask"]
        features = torch.log1p(torch.where(keys, counts.float(), 0.0))[..., None]
        tokens = self.gene_embedding(gene_ids).float() + self.count_mlp(in_dtype_of(features, self.count_mlp[0]))
        # The queries start from the cell's expression-weighted sum of gene vectors (scVI's first layer, over any
        # panel): softmax attention over a thousand genes alone averages cells into one another.
        weight = features[..., 0]  # log1p counts; 0 at <cls> and padding
        bag = self.bag_norm((self.bag_embedding(gene_ids).float() * weight[..., None]).sum(dim=1))
        x = self.queries.float()[None] + bag[:, None, :]
        x = self.cross(x, tokens, keys)
        x = self_attention(self.blocks, x, x.new_zeros(x.shape[0], self.cfg.d_model))
        mean, logvar = self.posterior(self.encoder_norm(x)).chunk(2, dim=-1)
        return Posterior(mean, logvar.clamp(self.cfg.logvar_min, self.cfg.logvar_max))

    def decode(self, z: Tensor, gene_ids: Tensor, log_library: Tensor) -> NBParams:
        """NB parameters [B, G] of the genes ``gene_ids`` [B, G] given latents ``z`` [B, m, d] and ``log L`` [B]."""
        context = self.latent_in(in_dtype_of(z, self.latent_in)).float() + self.latent_position.weight.float()
        library = log_library.float()[:, None, None]
        x = self.query_embedding(gene_ids).float() + self.library_mlp(in_dtype_of(library, self.library_mlp[0]))
        for block in self.decoder:
            x = block(x, context)
        out = self.head(self.decoder_norm(x))
        log_mu = self.gene_log_rate(gene_ids)[..., 0].float() + out[..., 0] + log_library.float()[:, None]
        log_theta = self.gene_log_theta(gene_ids)[..., 0].float().clamp(*LOG_THETA_RANGE)
        return NBParams(log_mu, log_theta, out[..., 1] if self.cfg.zero_inflated else None)

    def forward(
        self, batch: dict[str, Tensor], generator: torch.Generator | None = None, encode_only: bool = False
    ) -> VAEOutput | Posterior:
        """``loss(batch)``, or with ``encode_only`` the posterior ``encode(batch)``.

        The Composer wrappers call the VAE through here, not through its methods: under FSDP2 the VAE is a
        sharded unit (Composer wraps every child of the ``ComposerModel``) whose weights are gathered by hooks
        on ``__call__`` only.
        """
        return self.encode(batch) if encode_only else self.loss(batch, generator)

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> VAEOutput:
        """The beta-weighted negative ELBO of a collator batch (one posterior sample per cell)."""
        real = batch["real"]
        posterior = self.encode(batch)
        z = posterior.sample(generator)
        params = self.decode(z, batch["gene_ids"], log_library(batch["counts"], real))
        nll = -torch.where(real, params.log_prob(batch["counts"]), 0.0).sum(dim=1)
        kl = posterior.kl()
        return VAEOutput(
            loss=(nll + self.cfg.beta * kl).mean(),
            nll_sum=nll.detach().sum(),
            kl_sum=kl.detach().sum(),
            num_genes=real.sum(),
            num_cells=torch.tensor(real.shape[0], device=real.device),
        )

    def compile_blocks(self) -> None:
        compile_blocks(self)

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """One FSDP unit per block (encoder and decoder), like the DiT."""
        return is_block(module)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        return is_block(module)
