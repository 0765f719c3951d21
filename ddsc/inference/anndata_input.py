"""AnnData -> the model's view of the cells: gene mapping, raw-count validation, entries to hide, obs conditions.

Features are mapped to the model's gene vocabulary by Ensembl id, falling back to a unique symbol
(``GeneVocab``); unmatched features are ignored and counted. Counts are checked by the rule data_prep applies
(``ddsc.data.raw_counts``), with the same message.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from ddsc.data.anndata_source import FeatureMapping, map_features
from ddsc.data.labels import LabelVocab
from ddsc.data.raw_counts import check_raw_counts, gene_names
from ddsc.data.readers import ENSEMBL_COLUMNS, var_features
from ddsc.data.vocab import GeneVocab
from ddsc.inference.rows import CellEntries
from ddsc.model.config import ConditionConfig


def map_genes(vocab: GeneVocab, adata) -> FeatureMapping:
    """Token id per AnnData feature (-1 unmatched); an error when no feature is in the vocabulary."""
    ensembl, symbols = var_features(adata.var)
    mapping = map_features(vocab, ensembl, symbols)
    if not np.any(mapping.tokens >= 0):
        raise ValueError(
            f"none of the {adata.n_vars} AnnData genes is in the model's gene vocabulary (matched 0 of "
            f"{adata.n_vars} by Ensembl id or symbol; first genes: {', '.join(map(str, adata.var_names[:3]))}); "
            f"var needs Ensembl ids ({'/'.join(ENSEMBL_COLUMNS)} or the index) or symbols"
        )
    return mapping


def gene_report(mapping: FeatureMapping) -> dict[str, int]:
    report = mapping.report()
    return {
        "genes": report["features"],
        "matched_genes": report["features"] - report["unmatched"] - report["duplicate_token"],
        "duplicate_genes": report["duplicate_token"],
    }


def raw_counts(adata, layer: str | None = None, round_counts: bool = False) -> sp.csr_matrix:
    """The cells' raw counts (``X`` or ``layer``), float32 CSR. Raw integer counts are required, by the rule
    data_prep applies: normalised values are refused unless ``round_counts``."""
    where = layer or "X"
    x = sp.csr_matrix(adata.X if layer is None else adata.layers[layer])
    genes = gene_names(*var_features(adata.var))
    data = check_raw_counts(x.data, x.indptr, x.indices, adata.obs_names, genes, where, round_counts)
    x = sp.csr_matrix((data, x.indices, x.indptr), shape=x.shape, dtype=np.float32)
    bad = ~np.isfinite(x.data) | (x.data < 0)  # what integer storage or rounding lets through
    if bad.any():
        row = int(np.searchsorted(x.indptr, np.flatnonzero(bad)[0], side="right") - 1)
        raise ValueError(
            f"{where}: cell {adata.obs_names[row]!r} (row {row}) has a negative or NaN value; the model needs raw "
            "counts"
        )
    return x


def cell_entries(mapping: FeatureMapping, x: sp.csr_matrix, hide: sp.csr_matrix | None = None) -> CellEntries:
    """Per cell: its non-zero matched entries of the counts ``x`` plus the ``hide`` entries (matched genes)."""
    known = mapping.tokens >= 0
    keep = x.copy()
    keep.data = np.ones_like(keep.data)
    if hide is not None:
        keep = keep.maximum(hide.astype(np.float32))
    keep = (keep @ sp.diags(known.astype(np.float32))).tocsr()
    keep.eliminate_zeros()
    keep.sort_indices()
    rows = np.repeat(np.arange(keep.shape[0]), np.diff(keep.indptr))
    counts = np.asarray(x[rows, keep.indices]).ravel() if keep.nnz else np.zeros(0, np.float32)
    hidden = (np.asarray(hide[rows, keep.indices]).ravel() > 0) if hide is not None else np.zeros(keep.nnz, bool)
    return CellEntries(
        keep.indptr.astype(np.int64),
        mapping.tokens[keep.indices],
        counts.astype(np.float32),
        keep.indices.astype(np.int64),
        hidden,
    )


def hide_matrix(adata, x: sp.csr_matrix, mask_fraction, mask, genes, seed: int) -> sp.csr_matrix:
    """Cells x genes bool: the entries ``impute`` hides and predicts (see ``impute``'s arguments)."""
    shape = (adata.n_obs, adata.n_vars)
    hide = sp.csr_matrix(shape, dtype=bool)
    if mask_fraction is not None:
        if not 0.0 < mask_fraction < 1.0:
            raise ValueError(f"mask_fraction must be in (0, 1), got {mask_fraction}")
        chosen = x.copy()
        chosen.eliminate_zeros()
        chosen.data = np.random.default_rng(seed).random(chosen.nnz) < mask_fraction
        hide = hide + chosen.astype(bool)
    if mask is not None:
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {shape} (cells x genes)")
        hide = hide + sp.csr_matrix(mask, dtype=bool)
    if genes is not None:
        names = list(map(str, adata.var_names))
        missing = [g for g in genes if g not in set(names)]
        if missing:
            raise ValueError(f"genes not in var_names: {', '.join(missing[:5])} ({len(missing)} of {len(genes)})")
        columns = np.zeros(adata.n_vars, dtype=bool)
        columns[[names.index(g) for g in genes]] = True
        hide = hide + sp.csr_matrix(np.broadcast_to(columns, shape))
    if mask_fraction is None and mask is None and genes is None:
        raise ValueError("impute: give mask_fraction, mask or genes (what to hide and predict)")
    return sp.csr_matrix(hide, dtype=bool)


def obs_conditions(
    adata, specs: Sequence[ConditionConfig], labels: LabelVocab
) -> tuple[dict[str, list[str]], dict[str, int]]:
    """The model's conditions read from ``obs`` (a column named like the condition, else its MDS ``column``),
    and per label condition the number of cells whose label the model does not know: those cells get the null
    label, counted rather than refused (a new dataset's cell lines are not an error)."""
    values, unknown = {}, {}
    for spec in specs:
        column = next((c for c in (spec.name, spec.column) if c and c in adata.obs), None)
        if column is None:
            continue
        vals = ["" if v in ("nan", "None") else v for v in adata.obs[column].astype(str)]
        if spec.kind == "label":
            ids = labels.encode(spec.name, vals)
            unseen = np.array([bool(v) for v in vals]) & (np.asarray(ids) == 0)
            unknown[spec.name] = int(unseen.sum())
            vals = ["" if u else v for v, u in zip(vals, unseen, strict=True)]
        values[spec.name] = vals
    return values, unknown
