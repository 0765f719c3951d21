"""De novo cells over a gene panel with a loaded model, under given conditions and classifier-free guidance."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anndata
import numpy as np
import torch
from torch import Tensor

from ddsc.data.batch_layout import model_batch
from ddsc.data.tokens import ExpressionTokens
from ddsc.diffusion.sampler_names import Method
from ddsc.diffusion.samplers import sample
from ddsc.inference.loaded import Conditions, LoadedModel
from ddsc.trajectory import save_trajectory_gif


def panel_tokens(loaded: LoadedModel, gene_panel: Sequence[str]) -> np.ndarray:
    """``LoadedModel.panel``, at most ``max_genes`` long (the model's training length)."""
    tokens = loaded.panel(gene_panel)
    if not 0 < len(tokens) <= loaded.max_length:
        raise ValueError(f"gene panel: {len(tokens)} genes; the model takes 1 to {loaded.max_length} per cell")
    return tokens


def generate(
    loaded: LoadedModel,
    gene_panel: Sequence[str],
    conditions: Conditions | None = None,
    n_cells: int = 1,
    method: Method = "first_hitting",
    steps: int = 32,
    temperature: float = 1.0,
    guidance_scale: float = 1.0,
    seed: int = 0,
    trajectory_gif: str | Path | None = None,
):
    """De novo cells over ``gene_panel`` (same panel for every cell): an AnnData of expression bins.

    ``conditions``: ``{column: values}`` with one value or one per cell; ``""`` or a missing column is the
    null label (unconditional in that condition). ``X`` holds the generated bins (0..num_bins-1); ``obs`` the
    conditions; ``uns["ddsc_generate"]`` the sampler settings and its number of forward passes.
    ``trajectory_gif`` saves the denoising of the first batch as an animated GIF.
    """
    tokens = torch.from_numpy(panel_tokens(loaded, gene_panel))
    conditions = {k: [str(v) for v in vals] for k, vals in (conditions or {}).items()}
    cond = loaded.encode(conditions, n_cells)
    generator = loaded.generator(seed)
    bins, nfe = [], 0
    with loaded.bar(n_cells, "generate") as bar, loaded.autocast():
        for start in range(0, n_cells, loaded.batch_size):
            count = min(loaded.batch_size, n_cells - start)
            batch = panel_batch(tokens, cond[start : start + count], loaded.tokens)
            keep = trajectory_gif is not None and start == 0
            out = sample(
                loaded.model,
                batch,
                method=method,
                steps=steps,
                temperature=temperature,
                guidance_scale=guidance_scale,
                generator=generator,
                return_trajectory=keep,
                diffusion=loaded.diffusion,
            )
            if keep:
                save_trajectory_gif([x[:, 1:].cpu() for x in out.trajectory], loaded.tokens, trajectory_gif)
            bins.append(out.expr[:, 1:].cpu())
            nfe += out.nfe
            bar.update(count)
    obs, var = loaded.generated_frames(conditions, n_cells, tokens.numpy(), gene_panel)
    adata = anndata.AnnData(X=torch.cat(bins).numpy().astype(np.float32), obs=obs, var=var)
    adata.uns["ddsc_generate"] = {
        "method": method,
        "steps": steps,
        "temperature": temperature,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "nfe": nfe,
    }
    return adata


def panel_batch(tokens: Tensor, cond: Tensor, expression: ExpressionTokens) -> dict[str, Tensor]:
    """Fully masked cells over the panel ``tokens``: where every sampler starts."""
    genes = tokens.to(cond.device).expand(len(cond), -1)
    real = torch.ones(genes.shape, dtype=torch.bool, device=cond.device)
    return model_batch(genes, torch.full_like(genes, expression.mask), real, expression, cond)
