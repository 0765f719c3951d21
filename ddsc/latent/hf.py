"""Hugging Face wrappers of a trained latent-diffusion model: ``DDSCLatentConfig`` and ``DDSCLatentModel``.

One ``PreTrainedModel`` holds all three things a latent model needs at use time: the cell VAE (encoder for
embeddings, NB decoder for counts), the latent DiT (the velocity of the rectified flow) and the latent scale
the DiT was trained on (``latent_std``: the DiT sees ``z / latent_std``). One folder, one ``from_pretrained``,
instead of two exports that could be paired wrongly.

Like ``ddsc.model.hf`` this file ships verbatim in the export (``ddsc.latent.export``), its ``ddsc`` imports
rewritten to relative ones, so ``AutoModel.from_pretrained(dir, trust_remote_code=True)`` works without
``ddsc``; it must import every shipped module directly (transformers copies only the entry module's own
relative imports), hence the imports marked "shipped".

``config.json`` stores every field explicitly. ``library`` is the distribution of the log library sizes the
VAE decoder was trained with (``LibraryHistogram`` of ``ddsc.train.latent_models``: the sums of the counts the
collator kept per cell, ``max_genes`` genes at most), which generation draws from: the decoder's rates are
shares of that library, so another library would change their meaning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from ddsc.data.chemistry import morgan_fingerprint  # noqa: F401 (shipped: conditions.py fingerprints with it)
from ddsc.data.tokens import ExpressionTokens  # noqa: F401 (shipped: dit.py imports it)
from ddsc.errors import ConfigError  # noqa: F401 (shipped: the latent config raises it)
from ddsc.latent.blocks import CrossBlock  # noqa: F401 (shipped: vae.py imports it)
from ddsc.latent.config import LatentDiTConfig, LatentVAEConfig
from ddsc.latent.flow import RectifiedFlow
from ddsc.latent.latent_dit import LatentDiT
from ddsc.latent.nb import nb_log_prob_log_space  # noqa: F401 (shipped: vae.py imports it)
from ddsc.latent.vae import LatentVAE, NBParams
from ddsc.model.conditions import encode_conditions
from ddsc.model.config import ConditionConfig
from ddsc.model.dit import DiT  # noqa: F401 (shipped: the latent modules reuse its blocks)


class DDSCLatentConfig(PretrainedConfig):
    """``vae`` / ``dit``: the ``LatentVAEConfig`` / ``LatentDiTConfig`` fields (the DiT's ``vae`` path emptied),
    ``conditions``: the ``ConditionConfig`` dicts, plus the vocabulary size, ``max_genes``, ``latent_std``,
    ``library`` and the data's ``binning`` (a plain dict, for comparisons with the masked family)."""

    model_type = "ddsc_latent"
    has_no_defaults_at_init = True

    def __init__(
        self,
        vae: dict[str, Any] | None = None,
        dit: dict[str, Any] | None = None,
        conditions: Sequence[dict[str, Any]] = (),
        gene_vocab_size: int = 0,
        max_genes: int = 1024,
        latent_std: float = 1.0,
        library: dict[str, Any] | None = None,
        binning: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.vae = dataclasses.asdict(LatentVAEConfig(**(vae or {})))  # validates, and fills every field
        self.dit = {**dataclasses.asdict(LatentDiTConfig(**(dit or {}))), "vae": ""}
        self.conditions = [
            dataclasses.asdict(c if isinstance(c, ConditionConfig) else ConditionConfig(**c)) for c in conditions
        ]
        self.gene_vocab_size = gene_vocab_size
        self.max_genes = max_genes
        self.latent_std = float(latent_std)
        self.library = dict(library or {})
        self.binning = dict(binning or {})

    def vae_config(self) -> LatentVAEConfig:
        return LatentVAEConfig(**self.vae)

    def dit_config(self) -> LatentDiTConfig:
        return LatentDiTConfig(**self.dit)

    def condition_specs(self) -> list[ConditionConfig]:
        return [ConditionConfig(**c) for c in self.conditions]

    @property
    def condition_names(self) -> list[str]:
        return [c["name"] for c in self.conditions]


class DDSCLatentModel(PreTrainedModel):
    """The VAE (``vae``) and the latent DiT (``dit``); ``forward`` is the DiT's velocity over scaled latents.

    ``encode`` / ``decode`` / ``sample_latents`` work in the VAE's own (unscaled) latent space, so a user never
    handles ``latent_std``; ``forward(x, t, cond)`` is the bare velocity model ``RectifiedFlow`` integrates.
    """

    config_class = DDSCLatentConfig
    base_model_prefix = "latent"
    main_input_name = "x"
    _no_split_modules = ["DiTBlock", "CrossBlock"]

    def __init__(self, config: DDSCLatentConfig):
        super().__init__(config)
        vae_cfg = config.vae_config()
        self.vae = LatentVAE(vae_cfg, config.gene_vocab_size)
        self.dit = LatentDiT(config.dit_config(), vae_cfg.n_latents, vae_cfg.d_latent, config.condition_specs())
        self.flow = RectifiedFlow(config.dit_config())
        self.post_init()

    def _init_weights(self, module) -> None:
        """transformers calls this for modules a checkpoint did not fill; the modules own their initialisation."""
        if isinstance(module, (LatentVAE, LatentDiT)):
            module.reset_parameters()

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.dit.n_latents, self.dit.d_latent

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.dit(x, t, cond)

    def encode(self, gene_ids: Tensor, counts: Tensor, attention_mask: Tensor) -> Tensor:
        """Posterior means float32 [B, m, d] of collator-layout cells (``<cls>`` at 0, keys ``attention_mask``)."""
        batch = {"gene_ids": gene_ids, "counts": counts, "attention_mask": attention_mask}
        return self.vae(batch, encode_only=True).mean

    def decode(self, z: Tensor, gene_ids: Tensor, log_library: Tensor) -> NBParams:
        """The NB of genes ``gene_ids`` [B, G] given latents ``z`` [B, m, d] and log library sizes [B]."""
        return self.vae.decode(z, gene_ids, log_library)

    @torch.no_grad()
    def sample_latents(
        self, noise: Tensor, cond: Tensor | None = None, steps: int | None = None, guidance_scale: float | None = None
    ) -> Tensor:
        """Latents [B, m, d] in the VAE's space from ``noise`` [B, m, d] (Euler, classifier-free guidance)."""
        return self.flow.sample(self, noise, cond, steps, guidance_scale) * self.config.latent_std

    def sample_log_library(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` log library sizes drawn from the training histogram (uniform within a bin), float32."""
        lib = self.config.library
        weights = torch.tensor(lib["counts"], dtype=torch.float64)
        if weights.sum() <= 0:
            raise ValueError("config.library holds no cells: this export cannot draw library sizes")
        device = generator.device if generator is not None else self.device
        weights = weights.to(device)
        index = torch.multinomial(weights, n, replacement=True, generator=generator)
        width = (lib["high"] - lib["low"]) / len(lib["counts"])
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return (lib["low"] + (index.double() + u) * width).float()

    def encode_conditions(
        self, values: Mapping[str, Sequence[str]], n: int, labels: Mapping[str, Sequence[str]] | None = None
    ) -> Tensor:
        """The ``cond`` tensor of ``n`` cells from raw values (as ``DDSCModel.encode_conditions``)."""
        index = {col: {v: i + 1 for i, v in enumerate(vals)} for col, vals in (labels or {}).items()}

        def label_ids(column: str, vals: Sequence[str]) -> np.ndarray:
            return np.array([index.get(column, {}).get(v, 0) for v in vals], dtype=np.int64)

        cond = encode_conditions(self.config.condition_specs(), values, n, label_ids)
        return torch.from_numpy(cond).to(self.device)


# As in ddsc.model.hf: register only as ddsc itself, never from the remote-code copy.
if __name__ == "ddsc.latent.hf":
    AutoConfig.register(DDSCLatentConfig.model_type, DDSCLatentConfig, exist_ok=True)
    AutoModel.register(DDSCLatentConfig, DDSCLatentModel, exist_ok=True)
