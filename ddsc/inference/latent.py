"""The latent family at use time: a loaded ``DDSCLatentModel`` folder, de novo counts, and cell embeddings.

``LatentLoadedModel`` is a ``LoadedModel`` for the AnnData adapter it shares (gene mapping, the raw-count check,
obs conditions, condition encoding and their checks); what differs is the model, so it sets the attributes
those shared methods read instead of the masked family's binning and collator.

Generation (``generate_counts``). Latents are sampled by the rectified flow (Euler, classifier-free guidance),
a library size per cell is drawn from the histogram of the libraries the decoder was trained with (the sums
of the counts the collator kept: the decoder's rates are shares of such a library, ``ddsc.latent.hf``), and
counts are drawn from the decoded NB of every panel gene. The decoder treats each gene on its own, so a panel
may have any number of genes, up to the whole vocabulary.

Embedding (``embed_latent``). The VAE posterior means, flattened to ``m * d`` values. A cell longer than the
model's ``max_genes`` (the encoder never saw more keys in training) is cut into the deterministic chunks of
``rows.gene_chunks`` and the chunks' means averaged: the embedding is a function of the cell's (gene, count)
set and the seed, not of AnnData's var order or of a random subset.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata
import numpy as np
import scipy.sparse as sp
import torch

from ddsc.config import from_dict
from ddsc.data.batch_layout import cell_layout, pad_cells
from ddsc.data.binning_config import BinningConfig
from ddsc.inference.loaded import Conditions, LoadedModel
from ddsc.inference.rows import gene_chunks
from ddsc.latent.flow import initial_noise
from ddsc.latent.hf import DDSCLatentModel
from ddsc.latent.nb import sample_nb

EMBEDDING_KEY = "X_ddsc_latent"
MEAN_LAYER = "ddsc_mean"


class LatentLoadedModel(LoadedModel):
    """A loaded latent export folder plus its vocabulary and labels (see the module docstring)."""

    family = "latent"
    model_class = DDSCLatentModel

    def setup_family(self) -> None:
        """Conditions, and the training data's binning and collator (``ddsc evaluate`` compares latent cells with
        real ones in the data's bins); None for an export without a binning."""
        self.specs = self.config.condition_specs()
        self.binning = from_dict(BinningConfig, self.config.binning) if self.config.binning else None
        self.collator = self.data_collator() if self.binning is not None else None


def latent_panel(loaded: LatentLoadedModel, gene_panel: Sequence[str]) -> np.ndarray:
    """``LoadedModel.panel`` of any size (the decoder answers each gene alone), not empty."""
    if not gene_panel:
        raise ValueError("gene panel: empty")
    return loaded.panel(gene_panel)


def generate_counts(
    loaded: LatentLoadedModel,
    gene_panel: Sequence[str],
    conditions: Conditions | None = None,
    n_cells: int = 1,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
):
    """De novo cells over ``gene_panel``: an AnnData of counts (see the module docstring).

    ``conditions`` as for the masked family (``{column: one value or one per cell}``, ``""`` = null). ``X``: NB
    counts (CSR float32); ``layers["ddsc_mean"]``: their expected values (the NB mean, times ``1 - pi`` when
    zero-inflated); ``obs``: the conditions and each cell's ``library_size``; ``uns["ddsc_generate"]``: the
    settings. ``steps`` / ``guidance_scale`` default to the training config's sampler settings.
    """
    tokens = torch.from_numpy(latent_panel(loaded, gene_panel)).to(loaded.device)
    dit = loaded.model.config.dit_config()
    steps, guidance_scale = steps or dit.sampler_steps, dit.guidance_scale if guidance_scale is None else guidance_scale
    conditions = {k: [str(v) for v in vals] for k, vals in (conditions or {}).items()}
    cond = loaded.encode(conditions, n_cells)
    generator = loaded.generator(seed)
    rng = np.random.default_rng(seed)
    counts, means, libraries = [], [], []
    with loaded.bar(n_cells, "generate") as bar, torch.no_grad(), loaded.autocast():
        for start in range(0, n_cells, loaded.batch_size):
            count = min(loaded.batch_size, n_cells - start)
            noise = initial_noise(count, loaded.model.latent_shape, generator)
            z = loaded.model.sample_latents(noise, cond[start : start + count], steps, guidance_scale)
            log_library = loaded.model.sample_log_library(count, generator)
            params = loaded.model.decode(z, tokens.expand(count, -1), log_library)
            mu, theta = params.log_mu.double().exp().cpu().numpy(), params.log_theta.double().exp().cpu().numpy()
            pi = None if params.zi_logits is None else torch.sigmoid(params.zi_logits.double()).cpu().numpy()
            counts.append(sample_nb(mu, theta, pi, rng))
            means.append((mu if pi is None else mu * (1 - pi)).astype(np.float32))
            libraries.append(log_library.double().exp().cpu().numpy())
            bar.update(count)
    obs, var = loaded.generated_frames(conditions, n_cells, tokens.cpu().numpy(), gene_panel)
    obs["library_size"] = np.concatenate(libraries)
    adata = anndata.AnnData(X=sp.csr_matrix(np.concatenate(counts)), obs=obs, var=var)
    adata.layers[MEAN_LAYER] = np.concatenate(means)
    batches = -(-n_cells // loaded.batch_size)
    adata.uns["ddsc_generate"] = {
        "family": "latent",
        "steps": steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "nfe": steps * batches,
        "library": "training histogram of log library sizes (config.json library)",
    }
    return adata


def embed_latent(
    loaded: LatentLoadedModel,
    adata,
    layer: str | None = None,
    seed: int = 0,
    round_counts: bool = False,
    conditions: Conditions | None = None,
):
    """``obsm["X_ddsc_latent"]`` [cells, m * d]: the VAE posterior means (see the module docstring). A cell with no
    matched expressed gene gets the encoding of the empty cell (``uns["ddsc_embed"]["empty_cells"]``).
    ``conditions`` is accepted for the masked family's interface and unused: the VAE encoder takes none."""
    cells = loaded.cells(adata, layer, round_counts)
    n, (m, d) = cells.n_cells, loaded.model.latent_shape
    rows = [  # (cell, its tokens and counts of one chunk)
        (i, cells.tokens[cells.cell(i)][part], cells.counts[cells.cell(i)][part])
        for i in range(n)
        for part in gene_chunks(cells.tokens[cells.cell(i)], loaded.max_length, seed)
    ]
    total = torch.zeros(n, m * d, dtype=torch.float64)
    chunks = torch.zeros(n, dtype=torch.float64)
    with loaded.bar(n, "embed") as bar, torch.no_grad(), loaded.autocast():
        for start in range(0, len(rows), loaded.batch_size):
            part = rows[start : start + loaded.batch_size]
            genes, counts, valid = pad_cells([t for _, t, _ in part], [c for _, _, c in part])
            cells_in = {k: v.to(loaded.device) for k, v in cell_layout(genes, valid, counts).items()}
            mean = loaded.model.encode(cells_in["gene_ids"], cells_in["counts"], cells_in["attention_mask"])
            target = torch.tensor([i for i, _, _ in part])
            total.index_add_(0, target, mean.double().cpu().reshape(len(part), -1))
            chunks.index_add_(0, target, torch.ones(len(part), dtype=torch.float64))
            bar.update(len(set(target.tolist())))
    out = adata.copy()
    out.obsm[EMBEDDING_KEY] = (total / chunks[:, None]).float().numpy()
    out.uns["ddsc_embed"] = {
        "family": "latent",
        "empty_cells": int((np.diff(cells.offsets) == 0).sum()),
        "seed": seed,
        **loaded.gene_report(adata),
    }
    return out


def refuse_impute(loaded: LatentLoadedModel, *args, **kwargs):
    raise ValueError("impute: this is a latent-family model; imputation (inpainting bins) needs a masked-family model")
