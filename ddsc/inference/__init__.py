"""Using a trained model on AnnData: impute (inpaint) masked entries, generate cells, embed cells.

``Predictor.from_pretrained(dir)`` loads an export folder (``ddsc export``) of either family, dispatching on
its ``config.json`` ``model_type``: a masked-family folder gives a ``Predictor``, a latent-family one a
``LatentPredictor`` (``ddsc.inference.latent``), with the same ``generate`` / ``embed`` interface. The package
is layered: the AnnData adapter (``anndata_input``: gene mapping, raw-count validation, masks, obs conditions;
``rows``: whole cells as deterministic chunks of model rows), the loaded model (``loaded``), and one module per
task (``imputation``, ``embedding``, ``generation``), each a function over a ``LoadedModel``. ``Predictor``
binds the tasks as methods; a new task is a function of the same kind plus a line here.
"""

from __future__ import annotations

import json
from pathlib import Path

from ddsc.inference.embedding import embed
from ddsc.inference.generation import generate, panel_tokens
from ddsc.inference.imputation import impute
from ddsc.inference.latent import LatentLoadedModel, embed_latent, generate_counts, latent_panel, refuse_impute
from ddsc.inference.loaded import LoadedModel, Precision, check_model_folder
from ddsc.inference.rows import gene_chunks, held_out_half
from ddsc.latent.hf import DDSCLatentConfig

__all__ = ["LatentPredictor", "LoadedModel", "Predictor", "check_model_folder", "gene_chunks", "held_out_half"]


class LatentPredictor(LatentLoadedModel):
    """A loaded latent-family model with the tasks it supports as methods (``generate``, ``embed``)."""

    embed = embed_latent
    generate = generate_counts
    panel_tokens = latent_panel
    impute = refuse_impute


class Predictor(LoadedModel):
    """A loaded model with the inference tasks as methods (``predictor.impute(adata, mask_fraction=0.3)``)."""

    impute = impute
    embed = embed
    generate = generate
    panel_tokens = panel_tokens

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str = "cpu", precision: Precision = "auto", **kwargs):
        """The predictor of the folder's family (``config.json`` ``model_type``)."""
        folder = check_model_folder(model_dir)
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type == DDSCLatentConfig.model_type:
            return LatentPredictor.from_pretrained(folder, device=device, precision=precision, **kwargs)
        return super().from_pretrained(folder, device=device, precision=precision, **kwargs)
