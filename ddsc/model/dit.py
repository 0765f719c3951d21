"""The DDSC backbone: a bidirectional DiT over a *set* of (gene, expression token) pairs.

Each position embeds its gene id and its expression token and sums them; there is no positional encoding, so
the network is permutation-equivariant over gene positions (gene order means nothing). Cell-level conditions
(cell line, drug, dose; optionally the diffusion time) are summed into one conditioning vector that modulates
every pre-norm block through adaLN-Zero (DiT, Peebles & Xie 2023): shift/scale after each LayerNorm and a
gate on each residual branch, all produced by a zero-initialised linear map, so every block starts as the
identity. With no conditions at all the vector is zero and the modulation reduces to learned constants (the
linear map's bias), which is still a valid adaLN-Zero block. The output head maps to the ``K`` expression bins
only (MDLM's SUBS parameterisation never predicts the mask).

Precision. The same code runs with float32 parameters under autocast (DDP, CPU, the fp32 engines) and with
bf16 parameters (FSDP/HSDP mixed precision hands each block bf16 unsharded weights; DeepSpeed's bf16 mode
casts the module), with or without autocast around it:

- The residual stream is float32: the embeddings are summed in float32 and every branch is added into a
  float32 stream. (FSDP2 casts the floating-point inputs of each wrapped module, a block's ``x`` and ``c``
  and the DiT's ``t``, to the parameter dtype on entry; that rounding is the mixed-precision policy's.)
- Every matmul over positions gets its input in its weight's dtype (``in_dtype_of``): a no-op for float32
  weights, where autocast (if on) picks bf16, and the required cast for bf16 weights.
- Float32 islands (``Float32Linear``): the adaLN maps, the time embedding and the output head compute in
  float32 with autocast off, on float32 copies of their weights. They see one row per cell (the head: one
  per position, but only ``K`` outputs), so this costs little, and it keeps the modulation, the gates and the
  logits (hence the log-softmax of the loss) out of bf16. With float32 parameters the copies are free; with
  bf16 parameters the weights are bf16-rounded, but products and sums are float32. They are ``nn.Linear``
  modules (same state-dict keys), so DeepSpeed ZeRO-3's per-module gather hooks still fire.

Padding. A batch is padded to its longest cell, but with ``model.attention: unpadded`` (the default) every
position-wise layer runs on the real tokens only and attention gets no mask at all when nothing is padding
(so CUDA's SDPA may pick flash attention); see ``Layout``. ``masked`` keeps the padded layout with a
key-padding mask everywhere, as the reference: both give the same logits at real positions (tested).

``fsdp_wrap_fn`` / ``activation_checkpointing_fn`` are defined here, on the module Composer hands to FSDP (it
reads them from the ``ComposerModel``'s children): each ``DiTBlock`` is its own FSDP unit and, when asked,
its own activation-checkpointing unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddsc.data.tokens import ExpressionTokens
from ddsc.model.conditions import column_slices, condition_encoder, null_cond
from ddsc.model.config import ModelConfig


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return torch.addcmul(shift, x, 1 + scale)  # x * (1 + scale) + shift in one pass over x


class Float32Linear(nn.Linear):
    """A linear map computed in float32 whatever the parameter dtype and the autocast state (see above)."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)


def in_dtype_of(x: Tensor, layer: nn.Linear) -> Tensor:
    """``x`` in ``layer``'s weight dtype: bf16 weights (FSDP / DeepSpeed mixed precision) need bf16 inputs."""
    return x.to(layer.weight.dtype)


def adaln_map(d_model: int, outputs: int) -> nn.Sequential:
    """SiLU then a float32 linear map to ``outputs * d_model`` modulation values (zero-initialised by the DiT)."""
    return nn.Sequential(nn.SiLU(), Float32Linear(d_model, outputs * d_model))


try:  # optional (the ``flash`` extra): attention over packed real tokens without any padding, CUDA only
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None


@dataclass
class Layout:
    """Where a ``[B, L]`` batch's real positions are, computed once per forward (``Layout.of``).

    ``index is None``: the model runs on ``[B, L, D]`` with ``key_mask`` (the ``masked`` reference) or, when no
    position is padding, with no mask at all, so CUDA's SDPA may pick its flash kernel. Otherwise every
    position-wise layer (embeddings, norms, modulation, projections, MLP, head) runs on the ``N`` real tokens
    ``[N, D]`` only, and attention either packs them for ``flash_attn_varlen_func`` (bf16/fp16 on CUDA with
    flash-attn installed) or scatters them back into the padded layout around one masked SDPA call.
    """

    batch: int
    length: int
    key_mask: Tensor | None = None  # bool [B, 1, 1, L], True = attend
    index: Tensor | None = None  # [N] flat positions (b * L + l) of the real tokens, in (cell, position) order
    cell: Tensor | None = None  # [N] the cell of each real token
    cu_seqlens: Tensor | None = None  # int32 [B + 1] token offsets of the cells (flash-attn's varlen layout)
    max_len: int = 0

    @classmethod
    def of(cls, attention_mask: Tensor, mode: str) -> Layout:
        batch, length = attention_mask.shape
        if mode == "masked":
            return cls(batch, length, key_mask=attention_mask[:, None, None, :])
        index = attention_mask.flatten().nonzero().squeeze(1)  # one host sync per forward, not per layer
        if index.numel() == batch * length:
            return cls(batch, length)
        lengths = attention_mask.sum(1)
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return cls(
            batch, length, attention_mask[:, None, None, :], index, index // length, cu_seqlens, int(lengths.max())
        )

    def per_cell(self, values: Tensor) -> Tensor:
        """Per-cell rows ``[B, F]`` broadcast to every position: ``[B, 1, F]`` or, unpadded, ``[N, F]``."""
        return values[:, None, :] if self.index is None else values[self.cell]

    def tokens(self, x: Tensor) -> Tensor:
        """``[B, L, ...]`` -> the layout's own shape (``[N, ...]`` when unpadded)."""
        return x if self.index is None else x.flatten(0, 1)[self.index]

    def padded(self, x: Tensor) -> Tensor:
        """The layout's shape -> ``[B, L, ...]``, padded positions zero."""
        if self.index is None:
            return x
        out = x.new_zeros(self.batch * self.length, *x.shape[1:]).index_copy(0, self.index, x)
        return out.view(self.batch, self.length, *x.shape[1:])


class Attention(nn.Module):
    """Multi-head self-attention over the real gene positions of each cell (``Layout`` says where they are)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, layout: Layout) -> Tensor:
        qkv = self.qkv(in_dtype_of(x, self.qkv))
        width = qkv.shape[-1] // 3
        dropout = self.dropout if self.training else 0.0
        if (
            layout.index is not None
            and flash_attn_varlen_func is not None
            and qkv.is_cuda
            and qkv.dtype != torch.float32
        ):
            q, k, v = qkv.view(-1, 3, self.n_heads, width // self.n_heads).unbind(1)
            cu, n = layout.cu_seqlens, layout.max_len
            out = flash_attn_varlen_func(q, k, v, cu, cu, n, n, dropout_p=dropout).reshape(-1, width)
            return self.proj(out)
        heads = layout.padded(qkv).view(layout.batch, layout.length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(*heads, attn_mask=layout.key_mask, dropout_p=dropout)
        return self.proj(layout.tokens(out.transpose(1, 2).reshape(layout.batch, layout.length, width)))


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation from the conditioning vector ``c``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hidden = cfg.d_model, int(cfg.d_model * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.n_heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Dropout(cfg.dropout), nn.Linear(hidden, d)
        )
        self.adaln = adaln_map(d, 6)
        self.compiled = None  # set by ``DiT.compile_blocks``

    def forward(self, x: Tensor, c: Tensor, layout: Layout) -> Tensor:
        return (self.compiled or self.body)(x, c, layout)

    def body(self, x: Tensor, c: Tensor, layout: Layout) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = layout.per_cell(self.adaln(c.float())).chunk(6, dim=-1)
        x = torch.addcmul(x.float(), gate1, self.attn(modulate(self.norm1(x), shift1, scale1), layout))
        h = modulate(self.norm2(x), shift2, scale2)
        return torch.addcmul(x, gate2, self.mlp(in_dtype_of(h, self.mlp[0])))


class TimeEmbedding(nn.Module):
    """Sinusoidal features of the diffusion time t in [0, 1] followed by a small MLP (as in DiT)."""

    def __init__(self, d_model: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(Float32Linear(frequencies, d_model), nn.SiLU(), Float32Linear(d_model, d_model))

    def forward(self, t: Tensor) -> Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None, :]
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))


def init_weights(root: nn.Module) -> None:
    """DiT's initialisation of every linear (xavier, zero bias) and embedding (N(0, 0.02)) below ``root``."""
    for module in root.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)


class DiT(nn.Module):
    """Gene-ID-conditioned DiT denoiser: ``forward(...) -> logits float32 [B, L, num_bins]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        for condition in cfg.conditions:
            if condition.kind == "label" and condition.num_labels <= 0:
                raise ValueError(f"model.conditions.{condition.name}.num_labels must be filled (> 0) before building")
        if cfg.gene_vocab_size <= 0:
            raise ValueError(
                "model.gene_vocab_size must be filled (> 0) before building (a run takes vocab.json's size)"
            )
        self.cfg = cfg
        self.tokens = ExpressionTokens(cfg.num_bins)
        d = cfg.d_model
        self.gene_embedding = nn.Embedding(cfg.gene_vocab_size, d)
        self.expr_embedding = nn.Embedding(self.tokens.vocab_size, d)
        # One encoder per condition (``ddsc.model.conditions``), each with a learned null (CFG's unconditional branch).
        self.cond_embeddings = nn.ModuleList(condition_encoder(c, d) for c in cfg.conditions)
        self.cond_columns = column_slices(cfg.conditions)
        self.time_embedding = TimeEmbedding(d) if cfg.time_conditioning else None
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_adaln = adaln_map(d, 2)
        self.head = Float32Linear(d, cfg.num_bins)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT initialisation: xavier linears, N(0, 0.02) embeddings, zero adaLN maps and zero output head."""
        init_weights(self)
        for adaln in [*(block.adaln for block in self.blocks), self.final_adaln]:
            nn.init.zeros_(adaln[-1].weight)
            nn.init.zeros_(adaln[-1].bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def condition(self, batch_size: int, device: torch.device, cond: Tensor | None, t: Tensor | None) -> Tensor:
        """The conditioning vector [B, D]: sum of condition embeddings (+ time embedding).

        ``cond`` is laid out as ``ddsc.model.conditions`` says; ``cond=None`` means every condition is null. In
        training mode each condition is independently replaced by null with its ``dropout`` probability, which
        trains the unconditional branch for guidance.
        """
        c = torch.zeros(batch_size, self.cfg.d_model, device=device)
        if self.cond_embeddings:
            if cond is None:
                cond = null_cond(self.cfg.conditions, batch_size, device)
            expected = (batch_size, self.cond_columns[-1].stop)
            if cond.shape != expected:
                raise ValueError(f"cond has shape {tuple(cond.shape)}, expected [{expected[0]}, {expected[1]}]")
            for encoder, spec, columns in zip(
                self.cond_embeddings, self.cfg.conditions, self.cond_columns, strict=True
            ):
                drop = torch.zeros(batch_size, dtype=torch.bool, device=device)
                if self.training and spec.dropout > 0:
                    drop = torch.rand(batch_size, device=device) < spec.dropout
                c = c + encoder(cond[:, columns], drop)
        if self.time_embedding is not None:
            if t is None:
                raise ValueError("model.time_conditioning is on: pass the diffusion time t")
            c = c + self.time_embedding(t)
        return c

    def _tokens(self, gene_ids: Tensor, expr: Tensor, attention_mask: Tensor, cond: Tensor | None, t: Tensor | None):
        """(final normed, modulated states of the layout's positions, float32; the layout)."""
        layout = Layout.of(attention_mask, self.cfg.attention)
        gene_ids, expr = layout.tokens(gene_ids), layout.tokens(expr)
        x = self.gene_embedding(gene_ids).float() + self.expr_embedding(expr).float()
        c = self.condition(attention_mask.shape[0], attention_mask.device, cond, t)
        for block in self.blocks:
            x = block(x, c, layout)
        shift, scale = layout.per_cell(self.final_adaln(c.float())).chunk(2, dim=-1)
        return modulate(self.final_norm(x), shift, scale).float(), layout

    def hidden(
        self,
        gene_ids: Tensor,
        expr: Tensor,
        attention_mask: Tensor,
        cond: Tensor | None = None,
        t: Tensor | None = None,
    ) -> Tensor:
        """Final normed, modulated hidden states float32 [B, L, D] (cell embedding: ``[:, 0]`` or a mean-pool)."""
        h, layout = self._tokens(gene_ids, expr, attention_mask, cond, t)
        return layout.padded(h)

    def forward(
        self,
        gene_ids: Tensor,
        expr: Tensor,
        attention_mask: Tensor,
        cond: Tensor | None = None,
        t: Tensor | None = None,
    ) -> Tensor:
        """Logits float32 [B, L, K]; at padded positions they are zero (``masked`` mode: whatever is computed)."""
        h, layout = self._tokens(gene_ids, expr, attention_mask, cond, t)
        return layout.padded(self.head(h))

    def compile_blocks(self) -> None:
        """``torch.compile`` each block's computation (``parallelism.compile``), one graph per block.

        The compiled function is the block's body, not the module: FSDP's and activation checkpointing's module
        hooks stay outside the graph, as with torchtitan's per-block compile.
        """
        for block in self.blocks:
            block.compiled = torch.compile(block.body, fullgraph=True)

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """Shard per transformer block (FSDP1, FSDP2, HSDP): only one block's weights are gathered at a time."""
        return isinstance(module, DiTBlock)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        """Recompute each block's activations in the backward pass (``parallelism.activation_checkpointing``)."""
        return isinstance(module, DiTBlock)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        params = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            params -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return params

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per position for sequences of ``seq_len``: for MFU.

        ``6 * (matmul weights applied per position) + 12 * n_layers * d_model * seq_len`` (attention scores and
        values, PaLM appendix B). Embedding lookups and the once-per-cell adaLN maps are not counted.
        """
        d, hidden = self.cfg.d_model, int(self.cfg.d_model * self.cfg.mlp_ratio)
        per_block = 4 * d * d + 2 * d * hidden
        weights = self.cfg.n_layers * per_block + d * self.cfg.num_bins
        return 6 * weights + 12 * self.cfg.n_layers * d * seq_len

    def flops(self, attention_mask: Tensor) -> float:
        """Training FLOPs of a batch counting real positions only: each cell at its own length (no padding)."""
        lengths = attention_mask.sum(1).double()
        per_cell = self.flops_per_token(0) * lengths + 12 * self.cfg.n_layers * self.cfg.d_model * lengths**2
        return float(per_cell.sum())
