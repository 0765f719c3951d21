"""Hugging Face wrappers: ``DDSCConfig`` (a ``PretrainedConfig``) and ``DDSCModel`` (a ``PreTrainedModel``).

This file ships verbatim inside every export (``ddsc.model.export``), next to ``config.py``, ``dit.py``,
``conditions.py``, ``chemistry.py`` and ``tokens.py``, with its ``ddsc`` imports rewritten to relative ones. That
is what lets ``transformers.AutoModel.from_pretrained(dir, trust_remote_code=True)`` work on a machine without
``ddsc``. So it may import only those modules (plus numpy, torch and transformers; RDKit only for molecule
conditions), and must import all of them directly: for a local folder transformers copies only the entry
module's own relative imports.

``config.json`` stores every field explicitly (no "differs from the default" diffing): a released model must
not change meaning when a default changes in a later version. Besides the architecture it carries what a user
needs to feed the model correctly: ``max_genes`` (genes per cell in training, ``data.max_length``; renamed
because transformers reserves ``max_length`` for generation), ``binning`` (how raw counts become bins) and
``diffusion`` (the noise schedule), as plain dicts.
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
from ddsc.data.tokens import ExpressionTokens
from ddsc.model.conditions import encode_conditions
from ddsc.model.config import ConditionConfig, ModelConfig
from ddsc.model.dit import DiT

MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}


class DDSCConfig(PretrainedConfig):
    """The DiT's ``ModelConfig`` fields plus ``max_genes``, ``binning`` and ``diffusion`` (plain dicts)."""

    model_type = "ddsc"
    has_no_defaults_at_init = True  # serialise every field, never a diff against today's defaults
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}

    def __init__(
        self,
        max_genes: int = 1024,
        binning: dict[str, Any] | None = None,
        diffusion: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        model_kwargs = {name: kwargs.pop(name) for name in MODEL_FIELDS if name in kwargs}
        conditions = [
            c if isinstance(c, ConditionConfig) else ConditionConfig(**c) for c in model_kwargs.pop("conditions", [])
        ]
        model = ModelConfig(**model_kwargs, conditions=conditions)  # validates (ValueError naming the field)
        super().__init__(**kwargs)
        for name in MODEL_FIELDS:
            setattr(self, name, getattr(model, name))
        self.conditions = [dataclasses.asdict(c) for c in model.conditions]
        self.max_genes = max_genes
        self.binning = dict(binning or {})
        self.diffusion = dict(diffusion or {})

    @classmethod
    def from_model_config(cls, model: ModelConfig, **kwargs: Any) -> DDSCConfig:
        return cls(**dataclasses.asdict(model), **kwargs)

    def model_config(self) -> ModelConfig:
        fields = {name: getattr(self, name) for name in MODEL_FIELDS if name != "conditions"}
        return ModelConfig(**fields, conditions=[ConditionConfig(**c) for c in self.conditions])

    @property
    def tokens(self) -> ExpressionTokens:
        """Expression token ids: bins ``0..num_bins-1``, then ``mask``, ``pad``, ``cls``."""
        return ExpressionTokens(self.num_bins)

    @property
    def condition_names(self) -> list[str]:
        return [c["name"] for c in self.conditions]


class DDSCModel(PreTrainedModel):
    """The DiT as a ``PreTrainedModel``; ``forward`` has the DiT's signature and returns its logits tensor.

    Returning the bare float32 ``[B, L, num_bins]`` tensor (not a ``ModelOutput``) keeps the model a drop-in
    denoiser for ``ddsc.diffusion`` (loss and samplers call ``model(gene_ids, expr, attention_mask, cond, t)``).
    """

    config_class = DDSCConfig
    base_model_prefix = "dit"
    main_input_name = "gene_ids"
    _no_split_modules = ["DiTBlock"]

    def __init__(self, config: DDSCConfig):
        super().__init__(config)
        self.dit = DiT(config.model_config())
        self.post_init()

    def _init_weights(self, module) -> None:
        """transformers calls this for modules a checkpoint did not fill; the DiT owns its initialisation."""
        if isinstance(module, DiT):
            module.reset_parameters()

    def forward(
        self,
        gene_ids: Tensor,
        expr: Tensor,
        attention_mask: Tensor,
        cond: Tensor | None = None,
        t: Tensor | None = None,
    ) -> Tensor:
        return self.dit(gene_ids, expr, attention_mask, cond, t)

    def hidden(
        self,
        gene_ids: Tensor,
        expr: Tensor,
        attention_mask: Tensor,
        cond: Tensor | None = None,
        t: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states float32 [B, L, D]: ``[:, 0]`` is the CLS embedding."""
        return self.dit.hidden(gene_ids, expr, attention_mask, cond, t)

    def encode_conditions(
        self, values: Mapping[str, Sequence[str]], n: int, labels: Mapping[str, Sequence[str]] | None = None
    ) -> Tensor:
        """The ``cond`` tensor of ``n`` cells from raw values ``{condition name: n values}`` (missing = null).

        Label conditions look their strings up in ``labels`` (the folder's ``labels.json``; unknown = null),
        molecule conditions fingerprint SMILES strings (needs RDKit), scalar conditions parse numbers. For use
        without ``ddsc``; ``ddsc.inference.Predictor`` does the same with checks on the labels.
        """
        index = {col: {v: i + 1 for i, v in enumerate(vals)} for col, vals in (labels or {}).items()}

        def label_ids(column: str, vals: Sequence[str]) -> np.ndarray:
            return np.array([index.get(column, {}).get(v, 0) for v in vals], dtype=np.int64)

        cond = encode_conditions(self.dit.cfg.conditions, values, n, label_ids)
        return torch.from_numpy(cond).to(self.device)


# Register with the Auto classes only as ``ddsc`` itself: the copy transformers loads as remote code must not
# replace ddsc's classes in the global registry of a process that has both.
if __name__ == "ddsc.model.hf":
    AutoConfig.register(DDSCConfig.model_type, DDSCConfig, exist_ok=True)
    AutoModel.register(DDSCConfig, DDSCModel, exist_ok=True)
