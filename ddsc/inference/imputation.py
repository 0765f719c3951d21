"""Impute (inpaint) hidden entries of AnnData cells with a loaded model; observed entries never change.

One answer per hidden entry, the same in every layer it writes: a bin (``argmax``: the most likely bin of one
forward pass; a sampler: the bin it draws with the observed entries fixed) and that bin's representative
count (``ddsc.data.binning.bin_values``: for per-cell quantile bins the cell's observed quantile at the middle
of the bin). ``ddsc evaluate`` scores a point estimate of another kind, the expectation of that count under
the predicted distribution (``ddsc.eval.counts``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch

from ddsc.diffusion.sampler_names import Method
from ddsc.diffusion.samplers import sample
from ddsc.inference.anndata_input import hide_matrix
from ddsc.inference.loaded import Conditions, LoadedModel

ImputeMethod = Literal["argmax", Method]  # argmax: one forward pass; or a sampler


def impute(
    loaded: LoadedModel,
    adata,
    mask_fraction: float | None = None,
    mask=None,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
    round_counts: bool = False,
    method: ImputeMethod = "argmax",
    steps: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
    conditions: Conditions | None = None,
):
    """Predict hidden entries. Returns a copy of ``adata`` with layers:

    - ``ddsc_mask`` (sparse bool): the entries that were hidden and predicted;
    - ``ddsc_bins`` (dense int16): observed bins at observed entries, the predicted bin at hidden ones, -1 for
      entries the model did not see (zeros not asked for, unmatched genes);
    - ``ddsc_imputed`` (sparse float32): observed counts, and the predicted bin's representative count at
      hidden entries.

    Hide entries by ``mask_fraction`` (of each cell's non-zero entries, drawn with ``seed``), by ``mask``
    (cells x genes, boolean, dense or sparse) and/or by ``genes`` (var names: hidden in every cell, zero or
    not). ``method``: ``argmax`` (one forward pass) or a sampler run for ``steps``. ``conditions``: the cells'
    conditions, by default from ``obs`` when the model has conditions (``LoadedModel.cell_conditions``).
    """
    cells = loaded.cells(adata, layer, round_counts, lambda x: hide_matrix(adata, x, mask_fraction, mask, genes, seed))
    cond, cond_report = loaded.cell_conditions(adata, conditions)
    predicted = np.full(len(cells.tokens), -1, dtype=np.int64)
    imputed = cells.counts.astype(np.float64)
    generator = loaded.generator(seed)
    with loaded.bar(cells.n_cells, "impute") as bar, torch.no_grad(), loaded.autocast():
        for index, rows in loaded.row_batches(cells, cond, seed):
            b = rows.batch
            if method == "argmax":
                logits = loaded.model(b["gene_ids"], b["expr"], b["attention_mask"], b["cond"])
                bins = logits.argmax(dim=-1)
            else:
                bins = sample(
                    loaded.model,
                    b,
                    method=method,
                    steps=steps,
                    temperature=temperature,
                    observed=rows.observed,
                    generator=generator,
                    diffusion=loaded.diffusion,
                ).expr
            bins = torch.where(rows.observed, b["expr"], bins).cpu()
            position = rows.flat >= 0
            flat = rows.flat[position]
            predicted[flat] = bins[position].numpy()
            value = rows.values[rows.cell[:, None].expand_as(bins), bins.clamp(max=rows.values.shape[1] - 1)]
            hidden = torch.from_numpy(cells.hidden)[flat]
            imputed[flat[hidden]] = value[position][hidden].numpy()
            bar.update(len(index))
    out = adata.copy()
    shape = (cells.n_cells, adata.n_vars)
    rows = np.repeat(np.arange(cells.n_cells), np.diff(cells.offsets))
    out.layers["ddsc_mask"] = sp.csr_matrix((cells.hidden, (rows, cells.columns)), shape=shape, dtype=bool)
    dense_bins = np.full(shape, -1, dtype=np.int16)
    dense_bins[rows, cells.columns] = predicted
    out.layers["ddsc_bins"] = dense_bins
    out.layers["ddsc_imputed"] = sp.csr_matrix((imputed.astype(np.float32), (rows, cells.columns)), shape=shape)
    out.uns["ddsc_impute"] = {
        "method": method,
        "answer": "argmax bin" if method == "argmax" else "sampled bin",
        "steps": steps,
        "temperature": temperature,
        "seed": seed,
        "hidden_entries": int(cells.hidden.sum()),
        "conditions": cond_report,
        **loaded.gene_report(adata),
    }
    return out
