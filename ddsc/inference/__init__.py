"""Using a trained model on AnnData: impute (inpaint) masked entries, generate cells, embed cells.

``Predictor.from_pretrained(dir)`` loads an export folder (``ddsc export``). The package is layered: the
AnnData adapter (``anndata_input``: gene mapping, raw-count validation, masks, obs conditions; ``rows``: whole
cells as deterministic chunks of model rows), the loaded model (``loaded``), and one module per task
(``imputation``, ``embedding``, ``generation``), each a function over a ``LoadedModel``. ``Predictor`` binds the
tasks as methods; a new task is a function of the same kind plus a line here.
"""

from __future__ import annotations

from ddsc.inference.embedding import embed
from ddsc.inference.generation import generate, panel_tokens
from ddsc.inference.imputation import impute
from ddsc.inference.loaded import LoadedModel, check_model_folder
from ddsc.inference.rows import gene_chunks, held_out_half

__all__ = ["LoadedModel", "Predictor", "check_model_folder", "gene_chunks", "held_out_half"]


class Predictor(LoadedModel):
    """A loaded model with the inference tasks as methods (``predictor.impute(adata, mask_fraction=0.3)``)."""

    impute = impute
    embed = embed
    generate = generate
    panel_tokens = panel_tokens
