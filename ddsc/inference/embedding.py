"""Cell embeddings with a loaded model: the model as a classifier of the cell over its training labels, and
its final hidden states (see ``embed``)."""

from __future__ import annotations

import numpy as np
import torch

from ddsc.inference.loaded import Conditions, LoadedModel
from ddsc.inference.rows import held_out_half
from ddsc.model.conditions import column_slices


def embed(
    loaded: LoadedModel,
    adata,
    layer: str | None = None,
    seed: int = 0,
    round_counts: bool = False,
    conditions: Conditions | None = None,
):
    """Cell embeddings of the clean cells. Output keys (``obsm``):

    - ``X_ddsc_labels`` [cells, labels]: the model as a classifier of the cell (the "diffusion classifier"
      of Li et al. 2023, arXiv:2303.16203): for every real label of every condition (``uns["ddsc_embed"]
      ["labels"]`` names the columns, ``"condition=label"``), the mean log-likelihood per gene of the cell's
      bins, each seeded half of its genes (``held_out_half``) hidden and predicted from the other half, with
      that label given and the other conditions null, centred over the labels of its condition. It reads
      the one thing training shapes, the masked-bin predictions under each condition; it carries cell state
      as far as the training labels describe it (a cell of an unseen cell line is placed relative to the
      seen ones) and is empty for a model without conditions.
    - ``X_ddsc_cls`` [cells, d_model]: the ``<cls>`` position's final hidden state, nothing masked, under the
      cells' ``conditions`` (by default from ``obs``, ``LoadedModel.cell_conditions``; ``{}``: null, what
      ``ddsc evaluate`` scores, since a state computed from a label encodes that label); ``X_ddsc_mean``: the final hidden states averaged over the cell's genes. No loss reaches
      these states (SUBS trains the final states of masked positions only); on the demo they separate
      nothing (the README's embedding table). Kept for comparison.

    Every gene a cell has in the vocabulary is used, deterministically: a cell longer than the model's
    ``max_genes`` is cut into chunks (``gene_chunks``, a function of ``seed`` and the cell's genes only, not
    of a training-time random subset) whose scores add up (``X_ddsc_labels``) or average (the others), every
    chunk seeing the bins of the whole cell. A cell with no matched non-zero gene gets zeros in
    ``X_ddsc_labels`` and ``X_ddsc_mean`` and the ``<cls>`` state of the empty cell
    (``uns["ddsc_embed"]["empty_cells"]``).
    """
    cells = loaded.cells(adata, layer, round_counts)
    n, width = cells.n_cells, loaded.config.d_model
    labels = [  # (cond column, label id, name) of every label of the label conditions
        (where.start, i, f"{spec.name}={label}")
        for spec, where in zip(loaded.specs, column_slices(loaded.specs), strict=True)
        if spec.kind == "label"
        for i, label in enumerate(loaded.labels.labels.get(spec.name, []), start=1)
    ]
    cls = torch.zeros(n, width, dtype=torch.float64)
    total = torch.zeros(n, width, dtype=torch.float64)
    chunks = torch.zeros(n, dtype=torch.float64)
    loglik = torch.zeros(n, len(labels), dtype=torch.float64)
    positions = torch.from_numpy(np.diff(cells.offsets)).double()
    held_out = torch.from_numpy(
        np.concatenate([np.zeros(0, bool)] + [held_out_half(cells.tokens[cells.cell(i)], seed) for i in range(n)])
    )
    cond, cond_report = loaded.cell_conditions(adata, conditions)
    null = loaded.encode({}, 1)
    with loaded.bar(n, "embed") as bar, torch.no_grad(), loaded.autocast():
        for index, rows in loaded.row_batches(cells, cond, seed):
            b = rows.batch
            h = loaded.model.hidden(b["gene_ids"], b["expr"], b["attention_mask"], b["cond"]).double().cpu()
            target = torch.from_numpy(index)[rows.cell]
            cls.index_add_(0, target, h[:, 0])
            chunks.index_add_(0, target, torch.ones(len(target), dtype=torch.float64))
            total.index_add_(0, target, (h * b["real"].cpu()[..., None]).sum(dim=1))
            half = ((rows.flat >= 0) & held_out[rows.flat.clamp(min=0)]).to(loaded.device)
            clean = b["expr"].clamp(max=loaded.config.num_bins - 1)[..., None]
            row_loglik = torch.zeros(len(target), len(labels), dtype=torch.float64)
            for hide in (half, b["real"] & ~half):  # each half predicted from the other: every gene once
                expr = b["expr"].masked_fill(hide, loaded.tokens.mask)
                for k, (column, label, _) in enumerate(labels):
                    given = null.expand(len(target), -1).clone()  # null conditions but this label
                    given[:, column] = label
                    logits = loaded.model(b["gene_ids"], expr, b["attention_mask"], given)
                    ll = logits.float().log_softmax(dim=-1).gather(-1, clean).squeeze(-1)
                    row_loglik[:, k] += (ll * hide).sum(dim=1).double().cpu()
            loglik.index_add_(0, target, row_loglik)
            bar.update(len(index))
    per_gene = loglik / positions.clamp(min=1)[:, None]
    for column in {c for c, _, _ in labels}:  # centred per condition: only differences between labels count
        columns = [k for k, (c, _, _) in enumerate(labels) if c == column]
        per_gene[:, columns] -= per_gene[:, columns].mean(dim=1, keepdim=True)
    out = adata.copy()
    out.obsm["X_ddsc_labels"] = per_gene.float().numpy()
    out.obsm["X_ddsc_cls"] = (cls / chunks[:, None]).float().numpy()
    out.obsm["X_ddsc_mean"] = (total / positions.clamp(min=1)[:, None]).float().numpy()
    out.uns["ddsc_embed"] = {
        "empty_cells": int((positions == 0).sum()),
        "labels": [name for _, _, name in labels],
        "seed": seed,
        "conditions": cond_report,
        **loaded.gene_report(adata),
    }
    return out
