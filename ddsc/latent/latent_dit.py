"""A DiT over a cell's ``m`` latent tokens: ``forward(x_t, t, cond) -> velocity`` for ``ddsc.latent.flow``.

The network is the masked family's DiT on another input: a linear map ``d -> d_model`` of each latent token
plus a learned embedding per latent slot (the VAE's slots are ordered, unlike genes), ``DiTBlock``s with
adaLN-Zero from the conditioning vector, a final adaLN-modulated norm and a zero-initialised float32 output
map ``d_model -> d``.

Reuse, not copies. The conditioning vector (condition embeddings with their learned nulls, per-condition
dropout in training mode for guidance, plus the time embedding), the DiT initialisation and the FSDP /
activation-checkpointing / compile hooks are ``DiT``'s own methods: this class keeps the attribute names they
read (``cfg``, ``cond_embeddings``, ``cond_columns``, ``time_embedding``, ``blocks``, ``final_adaln``,
``head``), so a change to how the DiT conditions or initialises applies here too.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ddsc.latent.blocks import self_attention
from ddsc.latent.config import LatentDiTConfig
from ddsc.model.conditions import column_slices, condition_encoder
from ddsc.model.config import ConditionConfig, ModelConfig
from ddsc.model.dit import DiT, DiTBlock, Float32Linear, TimeEmbedding, adaln_map, modulate


class LatentDiT(nn.Module):
    """Velocity model over latents ``[B, m, d]``: ``forward(x, t, cond) -> float32 [B, m, d]``."""

    condition = DiT.condition
    reset_parameters = DiT.reset_parameters
    compile_blocks = DiT.compile_blocks
    fsdp_wrap_fn = DiT.fsdp_wrap_fn
    activation_checkpointing_fn = DiT.activation_checkpointing_fn

    def __init__(self, cfg: LatentDiTConfig, n_latents: int, d_latent: int, conditions: Sequence[ConditionConfig] = ()):
        super().__init__()
        for condition in conditions:
            if condition.kind == "label" and condition.num_labels <= 0:
                raise ValueError(f"model.conditions.{condition.name}.num_labels must be filled (> 0) before building")
        self.latent_cfg = cfg
        self.n_latents, self.d_latent = n_latents, d_latent
        d = cfg.d_model
        # The block config DiTBlock and DiT.condition read (the gene vocabulary and bins mean nothing here).
        self.cfg = ModelConfig(
            d_model=d,
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            mlp_ratio=cfg.mlp_ratio,
            dropout=cfg.dropout,
            time_conditioning=True,
            conditions=list(conditions),
        )
        self.latent_in = nn.Linear(d_latent, d)
        self.latent_position = nn.Embedding(n_latents, d)
        self.cond_embeddings = nn.ModuleList(condition_encoder(c, d) for c in conditions)
        self.cond_columns = column_slices(conditions)
        self.time_embedding = TimeEmbedding(d)
        self.blocks = nn.ModuleList(DiTBlock(self.cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_adaln = adaln_map(d, 2)
        self.head = Float32Linear(d, d_latent)
        self.reset_parameters()

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The velocity at latents ``x`` [B, m, d] and times ``t`` [B]; ``cond=None``: every condition null."""
        if x.shape[1:] != (self.n_latents, self.d_latent):
            raise ValueError(f"latents have shape {tuple(x.shape)}, expected [B, {self.n_latents}, {self.d_latent}]")
        h = self.latent_in(x.to(self.latent_in.weight.dtype)).float() + self.latent_position.weight.float()
        c = self.condition(x.shape[0], x.device, cond, t)
        h = self_attention(self.blocks, h, c)
        shift, scale = self.final_adaln(c.float())[:, None, :].chunk(2, dim=-1)
        return self.head(modulate(self.final_norm(h), shift, scale))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_cell(self) -> int:
        """Training FLOPs (forward + backward) of one cell's ``m`` tokens, as ``DiT.flops_per_token`` counts."""
        d, m = self.cfg.d_model, self.n_latents
        per_block = 4 * d * d + 2 * d * int(d * self.cfg.mlp_ratio)
        weights = self.cfg.n_layers * per_block + 2 * d * self.d_latent
        return m * (6 * weights + 12 * self.cfg.n_layers * d * m)
