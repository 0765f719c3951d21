"""The pieces the latent family adds to ``ddsc.model.dit``: cross-attention, and the helpers both latent modules share.

Self-attention over latent tokens is the DiT's own ``DiTBlock`` (adaLN-Zero, float32 residual stream, float32
modulation); what the DiT lacks is attention from one set of tokens to another (latent queries over a cell's
genes in the encoder, gene queries over the latents in the decoder). ``CrossBlock`` follows the same precision
rules as ``DiTBlock``: a float32 residual stream, each matmul fed in its weight's dtype (bf16 under FSDP mixed
precision), and SDPA with a key mask where keys are padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddsc.model.dit import DiTBlock, Layout, in_dtype_of


class Float32LayerNorm(nn.LayerNorm):
    """A LayerNorm with affine parameters, computed in float32 whatever their dtype: under FSDP mixed precision
    they are bf16 while the residual stream stays float32, and ``layer_norm`` refuses mixed dtypes (the DiT's
    norms have no parameters; this is their ``Float32Linear``)."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


class CrossBlock(nn.Module):
    """Pre-norm cross-attention + MLP: ``x`` [B, Q, D] attends over ``context`` [B, K, D].

    ``key_mask`` bool [B, K] (True = attend) excludes padded context positions. There is no attention among the
    queries, so each query's output depends on the context alone, never on which other queries are asked:
    the decoder relies on this (a gene's prediction does not depend on the panel).
    """

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(d_model * mlp_ratio)
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm_q = Float32LayerNorm(d_model, eps=1e-6)
        self.norm_kv = Float32LayerNorm(d_model, eps=1e-6)
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = Float32LayerNorm(d_model, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout), nn.Linear(hidden, d_model)
        )
        self.compiled = None  # set by ``compile_blocks``

    def forward(self, x: Tensor, context: Tensor, key_mask: Tensor | None = None) -> Tensor:
        return (self.compiled or self.body)(x, context, key_mask)

    def body(self, x: Tensor, context: Tensor, key_mask: Tensor | None) -> Tensor:
        batch, queries, width = x.shape
        q = self.q(in_dtype_of(self.norm_q(x), self.q))
        k, v = self.kv(in_dtype_of(self.norm_kv(context), self.kv)).chunk(2, dim=-1)
        q, k, v = (h.view(batch, h.shape[1], self.n_heads, -1).transpose(1, 2) for h in (q, k, v))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        out = self.proj(out.transpose(1, 2).reshape(batch, queries, width))
        x = x.float() + out.float()
        return x + self.mlp(in_dtype_of(self.norm2(x), self.mlp[0])).float()


def self_attention(blocks: nn.ModuleList, x: Tensor, c: Tensor) -> Tensor:
    """``DiTBlock``s over ordered latent slots: every slot is real, so the layout has no mask (SDPA may use flash)."""
    layout = Layout(x.shape[0], x.shape[1])
    for block in blocks:
        x = block(x, c, layout)
    return x


def is_block(module: nn.Module) -> bool:
    """The FSDP / activation-checkpointing unit of the latent modules: one transformer block."""
    return isinstance(module, (DiTBlock, CrossBlock))


def compile_blocks(module: nn.Module) -> None:
    """``torch.compile`` every block's body (``parallelism.compile``), as ``DiT.compile_blocks`` does."""
    for block in module.modules():
        if is_block(block):
            block.compiled = torch.compile(block.body, fullgraph=True)
