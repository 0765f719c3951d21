"""Using a trained model on AnnData: impute (inpaint) masked entries, generate cells, embed cells.

``Predictor.from_pretrained(dir)`` loads an export folder (``ddsc export``). AnnData features are mapped to
the model's gene vocabulary by Ensembl id, falling back to a unique symbol (``GeneVocab``); unmatched features
are ignored and counted.

How a cell is fed to the model. Its positions are its non-zero entries plus the entries to predict (which may
be zero or unknown). Bins come from the *observed* entries only: a hidden count must not leak into the bin
edges of the counts that stay visible. A cell with more positions than the model saw in training
(``max_genes``) is split into chunks of at most ``max_genes`` positions (``gene_chunks``: deterministic, a
function of the seed and the cell's genes), every chunk seeing the same per-cell bins, so every entry is
predicted (and embeddings combine the chunks) instead of dropping genes.

Count scale. Bins are turned back into counts with a representative count per bin and cell (``bin_values``):
for per-cell quantile bins the cell's own observed quantile at the middle of the bin, for the fixed-edge
schemes the middle of the bin mapped back to counts. ``ddsc_imputed`` holds the expectation of that value
under the model's predicted distribution at hidden entries and the observed counts elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm.auto import tqdm

from ddsc.config import from_dict
from ddsc.data.anndata_source import FeatureMapping, map_features
from ddsc.data.binning import nonzero_bins
from ddsc.data.binning_config import BinningConfig
from ddsc.data.collator import CellCollator, pad_cells
from ddsc.data.labels import LabelVocab
from ddsc.data.raw_counts import check_raw_counts, gene_names
from ddsc.data.readers import ENSEMBL_COLUMNS, var_features
from ddsc.data.schema import METADATA_COLUMNS
from ddsc.data.tokens import GENE_CLS, GENE_PAD
from ddsc.data.vocab import GeneVocab
from ddsc.diffusion.config import DiffusionConfig
from ddsc.diffusion.sampler_names import Method
from ddsc.diffusion.samplers import sample
from ddsc.errors import InputError
from ddsc.model.conditions import ConditionValueError, column_slices, encode_conditions
from ddsc.model.export import LABELS_FILE, REQUIRED_FILES, VOCAB_FILE, WEIGHTS_FILE, check_labels
from ddsc.model.hf import DDSCConfig, DDSCModel
from ddsc.precision import autocast

ImputeMethod = Literal["argmax", Method]  # argmax: one forward pass; or a sampler
Precision = Literal["auto", "fp32", "bf16"]


def check_model_folder(model_dir: str | Path) -> Path:
    """A clear error naming every missing file, instead of a stack trace from the first loader that fails."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: not a complete DDSC model folder, missing {', '.join(missing)} (write one with `ddsc export`)"
        )
    weights = folder / WEIGHTS_FILE
    try:
        with safe_open(weights, framework="pt"):  # reads the header; checks that the file holds every tensor
            pass
    except SafetensorError as err:
        raise InputError(f"{weights}: not a complete safetensors file ({err}); export the model again") from None
    return folder


def row_quantiles(values: Tensor, valid: Tensor, q: Tensor) -> Tensor:
    """Per-row ``torch.quantile(row[valid], q)`` (linear interpolation), float64 [B, len(q)]; 0 for empty rows."""
    ordered = values.double().masked_fill(~valid, math.inf).sort(dim=1).values
    n = valid.sum(dim=1, keepdim=True)
    ranks = q.double()[None, :] * (n - 1).clamp(min=0)
    below, above = ranks.floor().long(), ranks.ceil().long()
    out = torch.lerp(ordered.gather(1, below), ordered.gather(1, above), ranks - below)
    return out.masked_fill(n == 0, 0.0)


def bin_values(counts: Tensor, observed: Tensor, cfg: BinningConfig, library_size: Tensor) -> Tensor:
    """A representative raw count per bin and cell, float64 [B, K] (the inverse of ``bin_counts``).

    ``quantile``: the cell's observed quantile at the middle of the bin's quantile range; fixed-edge schemes:
    the middle of the bin mapped back to counts. The zero bin (``zero_fraction > 0``) is 0.
    """
    first, k = nonzero_bins(cfg)
    middle = (torch.arange(k, dtype=torch.float64, device=counts.device) + 0.5) / k
    if cfg.method == "quantile":
        # quantiles at j / (2k), j = 1..2k-1: the odd ones are the bin middles (2b + 1) / (2k)
        values = row_quantiles(counts, observed & (counts > 0), middle)
    elif cfg.method == "global_log1p":
        scale = library_size.double().clamp(min=1.0)[:, None] / cfg.target_sum
        values = torch.expm1(middle * cfg.max_value)[None, :] * scale
    elif cfg.method == "log_uniform":
        values = torch.exp(middle * math.log(cfg.max_count)).expand(len(counts), k)
    else:
        values = (middle * cfg.max_count).expand(len(counts), k)
    zeros = torch.zeros(len(counts), first, dtype=torch.float64, device=counts.device)
    return torch.cat([zeros, values], dim=1)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a fixed hash of uint64 values (numpy's uint64 arithmetic wraps mod 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _gene_keys(tokens: np.ndarray, seed: int) -> np.ndarray:
    """A uint64 key per gene of a cell: a hash of (seed, the cell's set of genes, the gene) and nothing else, not
    the order the genes come in (AnnData's var order), the cell's row or the other cells of its batch."""
    seed_key = _mix64(np.array([seed % 2**64], dtype=np.uint64))
    genes = _mix64(np.asarray(tokens).astype(np.uint64) ^ seed_key)
    cell_key = _mix64(genes.sum(dtype=np.uint64, keepdims=True))  # a sum: the same for any order of the genes
    return _mix64(genes ^ cell_key)


def gene_chunks(tokens: np.ndarray, max_length: int, seed: int) -> list[np.ndarray]:
    """A cell's positions as ``ceil(n / max_length)`` chunks of near-equal size, together all of its genes.

    The positions are ordered by ``_gene_keys`` and cut along that order, so a cell gets the same model rows,
    hence the same embedding and imputation, wherever it is; different cells are cut differently.
    """
    order = np.argsort(_gene_keys(tokens, seed), kind="stable")
    return np.array_split(order, max(1, math.ceil(len(order) / max_length)))


def held_out_half(tokens: np.ndarray, seed: int) -> np.ndarray:
    """Bool per position: a seeded half of a cell's genes; ``embed`` predicts it from the other half, then the
    other half from it (``_gene_keys`` under another seed than the chunks: about half of every chunk)."""
    return (_gene_keys(tokens, seed ^ 0x5EED) >> np.uint64(63)).astype(bool)


@dataclass
class CellEntries:
    """Cells as ragged positions (flat arrays, CSR-style ``offsets``): the entries the model sees per cell."""

    offsets: np.ndarray  # int64 [n_cells + 1]
    tokens: np.ndarray  # int64 [nnz] gene token ids
    counts: np.ndarray  # float32 [nnz] (0 or unknown at hidden entries)
    columns: np.ndarray  # int64 [nnz] AnnData var column of each entry
    hidden: np.ndarray  # bool [nnz] entries to predict

    @property
    def n_cells(self) -> int:
        return len(self.offsets) - 1

    def cell(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))


@dataclass
class RowBatch:
    """Model rows (cells or chunks of cells) ready for the DiT, plus where each position came from."""

    batch: dict[str, Tensor]  # gene_ids, expr, attention_mask, real, cond
    observed: Tensor  # bool [R, L]
    flat: Tensor  # int64 [R, L]: index into CellEntries' flat arrays, -1 at cls / padding
    cell: Tensor  # int64 [R]: index of the row's cell within the cell batch
    values: Tensor  # float64 [B, K]: bin_values of the cell batch


class Predictor:
    """A loaded model plus everything needed to feed it user data (vocab, labels, binning, diffusion)."""

    def __init__(
        self,
        model: DDSCModel,
        vocab: GeneVocab,
        labels: LabelVocab,
        device: str | torch.device = "cpu",
        precision: Precision = "auto",
        batch_size: int = 64,
        progress: bool = True,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config: DDSCConfig = model.config
        self.vocab = vocab
        self.labels = labels
        check_labels(self.config, labels)
        self.binning = from_dict(BinningConfig, self.config.binning)
        self.diffusion = from_dict(DiffusionConfig, self.config.diffusion)
        self.tokens = self.config.tokens
        self.max_length = self.config.max_genes
        self.specs = self.config.model_config().conditions
        self.conditions = self.config.condition_names
        # Bins user counts exactly as in training (``bins_for``); conditions are encoded by ``_cond``.
        self.collator = CellCollator(
            self.max_length, self.binning, labels, self.specs, gene_vocab_size=self.config.gene_vocab_size
        )
        self.autocast_dtype = _autocast_dtype(precision, self.device)
        self.batch_size = batch_size
        self.progress = progress

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str = "cpu", precision: Precision = "auto", **kwargs):
        folder = check_model_folder(model_dir)
        model = DDSCModel.from_pretrained(folder)
        return cls(
            model,
            GeneVocab.from_json(folder / VOCAB_FILE),
            LabelVocab.from_json(folder / LABELS_FILE),
            device=device,
            precision=precision,
            **kwargs,
        )

    # ---------------------------------------------------------------- AnnData -> entries
    def map_genes(self, adata) -> FeatureMapping:
        """Token id per AnnData feature (-1 unmatched); an error when no feature is in the vocabulary."""
        ensembl, symbols = var_features(adata.var)
        mapping = map_features(self.vocab, ensembl, symbols)
        matched = int(np.count_nonzero(mapping.tokens >= 0))
        if matched == 0:
            raise ValueError(
                f"none of the {adata.n_vars} AnnData genes is in the model's gene vocabulary (matched 0 of "
                f"{adata.n_vars} by Ensembl id or symbol; first genes: {', '.join(map(str, adata.var_names[:3]))}); "
                f"var needs Ensembl ids ({'/'.join(ENSEMBL_COLUMNS)} or the index) or symbols"
            )
        return mapping

    def counts(self, adata, layer: str | None = None, round_counts: bool = False) -> sp.csr_matrix:
        """The cells' raw counts (``X`` or ``layer``), float32 CSR. Raw integer counts are required, by the rule
        data_prep applies (``ddsc.data.raw_counts``): normalised values are refused unless ``round_counts``."""
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

    def entries(self, adata, x: sp.csr_matrix, hide: sp.csr_matrix | None = None) -> CellEntries:
        """Per cell: its non-zero matched entries of the counts ``x`` plus the ``hide`` entries (matched genes)."""
        mapping = self.map_genes(adata)
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

    def samples_from_anndata(
        self, adata, layer: str | None = None, round_counts: bool = False
    ) -> tuple[list[dict], int]:
        """MDS-style samples (cell_id = obs name, genes, counts, and as strings the obs columns that are model
        conditions or MDS metadata columns) and the number of matched genes."""
        cells = self.entries(adata, self.counts(adata, layer, round_counts))
        obs = adata.obs
        columns = [col for col in dict.fromkeys([*self.conditions, *METADATA_COLUMNS]) if col in obs]
        samples = []
        for i in range(cells.n_cells):
            s = cells.cell(i)
            meta = {col: str(obs[col].iloc[i]) for col in columns}
            samples.append(
                {
                    "cell_id": str(adata.obs_names[i]),
                    "genes": cells.tokens[s].astype(np.int32),
                    "counts": cells.counts[s],
                    **meta,
                }
            )
        return samples, int(np.count_nonzero(self.map_genes(adata).tokens >= 0))

    # ---------------------------------------------------------------- batching
    def _cond(self, columns: dict[str, Sequence[str]], n: int) -> Tensor:
        """The ``cond`` tensor [n, W] (``ddsc.model.conditions``); a condition missing from ``columns`` is null.

        Labels must be known (``""`` is null); a molecule is any SMILES RDKit parses, seen in training or not; a
        scalar any number (a dose in the training unit; 0 for the vehicle control).
        """
        unknown = sorted(set(columns) - set(self.conditions))
        if unknown:
            raise ValueError(f"the model has no condition {unknown[0]!r} (its conditions: {self.conditions or 'none'})")
        values = {}
        for name, vals in columns.items():
            vals = [str(v) for v in vals]
            if len(vals) not in (1, n):
                raise ValueError(f"condition {name!r}: {len(vals)} values for {n} cells (give 1 or {n})")
            values[name] = vals * n if len(vals) == 1 else vals
        for spec in self.specs:
            if spec.kind != "label" or spec.name not in values:
                continue
            encoded = self.labels.encode(spec.name, values[spec.name])
            unseen = sorted({v for v, i in zip(values[spec.name], encoded, strict=True) if v and i == 0})
            if unseen:
                known = self.labels.labels[spec.name]
                raise ValueError(
                    f"condition {spec.name!r}: unknown label {unseen[0]!r} ({len(known)} known, e.g. "
                    f"{', '.join(known[:5])}); use '' for the null label"
                )
        try:
            cond = encode_conditions(self.specs, values, n, self.labels.encode)
        except ConditionValueError as err:
            raise ValueError(f"condition {err.name!r}: {err}") from None
        return torch.from_numpy(cond).to(self.device)

    def _row_batches(self, cells: CellEntries, cond: Tensor, seed: int) -> Iterator[tuple[np.ndarray, RowBatch]]:
        """Cell batches (their indices) and their model rows; long cells split into chunks (``gene_chunks``)."""
        for start in range(0, cells.n_cells, self.batch_size):
            index = np.arange(start, min(start + self.batch_size, cells.n_cells))
            yield index, self._rows(cells, index, cond[index], seed)

    def _rows(self, cells: CellEntries, index: np.ndarray, cond: Tensor, seed: int) -> RowBatch:
        slices = [cells.cell(i) for i in index]
        gene_ids, counts, valid = pad_cells([cells.tokens[s] for s in slices], [cells.counts[s] for s in slices])
        hidden, _, _ = pad_cells([cells.hidden[s].astype(np.int64) for s in slices], [cells.counts[s] for s in slices])
        observed = valid & (hidden == 0)
        library = (counts * observed).sum(dim=1, dtype=torch.float64)
        bins = self.collator.bins_for(counts, observed, library)
        expr = torch.where(observed, bins, torch.full_like(bins, self.tokens.mask))
        values = bin_values(counts, observed, self.binning, library)

        chunks = [  # (cell in batch, positions within the cell)
            (b, part) for b, s in enumerate(slices) for part in gene_chunks(cells.tokens[s], self.max_length, seed)
        ]
        width = 1 + max(len(p) for _, p in chunks)
        position = torch.full((len(chunks), width), -1, dtype=torch.long)
        for r, (_, part) in enumerate(chunks):
            position[r, 1 : 1 + len(part)] = torch.from_numpy(part)
        cell = torch.tensor([b for b, _ in chunks], dtype=torch.long)
        real = position >= 0
        gather = position.clamp(min=0)
        rows_gene = torch.where(real, gene_ids[cell][torch.arange(len(chunks))[:, None], gather], GENE_PAD)
        rows_expr = torch.where(real, expr[cell][torch.arange(len(chunks))[:, None], gather], self.tokens.pad)
        rows_gene[:, 0], rows_expr[:, 0] = GENE_CLS, self.tokens.cls
        rows_observed = real & observed[cell][torch.arange(len(chunks))[:, None], gather]
        flat = torch.where(real, torch.as_tensor(cells.offsets[index])[cell][:, None] + gather, -1)
        attention = real.clone()
        attention[:, 0] = True
        batch = {
            "gene_ids": rows_gene,
            "expr": rows_expr,
            "attention_mask": attention,
            "real": real,
            "cond": cond.cpu()[cell],
        }
        return RowBatch(
            {k: v.to(self.device) for k, v in batch.items()}, rows_observed.to(self.device), flat, cell, values
        )

    def _autocast(self) -> AbstractContextManager:
        return autocast(self.device.type, self.autocast_dtype)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="cell", disable=not self.progress)

    # ---------------------------------------------------------------- impute
    def impute(
        self,
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
    ):
        """Predict hidden entries; observed entries are never changed. Returns a copy of ``adata`` with layers:

        - ``ddsc_mask`` (sparse bool): the entries that were hidden and predicted;
        - ``ddsc_bins`` (dense int16): observed bins at observed entries, predicted bins at hidden ones, -1 for
          entries the model did not see (zeros not asked for, unmatched genes);
        - ``ddsc_imputed`` (sparse float32): observed counts, and the expected count at hidden entries.

        Hide entries by ``mask_fraction`` (of each cell's non-zero entries, drawn with ``seed``), by ``mask``
        (cells x genes, boolean, dense or sparse) and/or by ``genes`` (var names: hidden in every cell, zero or
        not). ``method``: ``argmax`` (one forward pass) or a sampler run for ``steps`` with observed entries fixed.
        """
        x = self.counts(adata, layer, round_counts)
        hide = self._hide_matrix(adata, x, mask_fraction, mask, genes, seed)
        cells = self.entries(adata, x, hide)
        cells.counts[cells.hidden] = 0.0
        predicted = np.full(len(cells.tokens), -1, dtype=np.int64)
        expected = cells.counts.astype(np.float64)
        cond = self._cond({}, cells.n_cells)
        generator = self._generator(seed)
        with self._bar(cells.n_cells, "impute") as bar, torch.no_grad(), self._autocast():
            for index, rows in self._row_batches(cells, cond, seed):
                logits = self.model(
                    rows.batch["gene_ids"], rows.batch["expr"], rows.batch["attention_mask"], rows.batch["cond"]
                )
                probs = (logits.double() / temperature).softmax(dim=-1).cpu()
                bins = probs.argmax(dim=-1)
                if method != "argmax":
                    bins = sample(
                        self.model,
                        rows.batch,
                        method=method,
                        steps=steps,
                        temperature=temperature,
                        observed=rows.observed,
                        generator=generator,
                        diffusion=self.diffusion,
                    ).expr.cpu()
                position = rows.flat >= 0
                flat = rows.flat[position]
                predicted[flat] = torch.where(rows.observed.cpu(), rows.batch["expr"].cpu(), bins)[position].numpy()
                mean = (probs * rows.values[rows.cell][:, None, :]).sum(dim=-1)
                hidden = torch.from_numpy(cells.hidden)[flat]
                expected[flat[hidden]] = mean[position][hidden].numpy()
                bar.update(len(index))
        out = adata.copy()
        shape = (cells.n_cells, adata.n_vars)
        rows = np.repeat(np.arange(cells.n_cells), np.diff(cells.offsets))
        out.layers["ddsc_mask"] = sp.csr_matrix((cells.hidden, (rows, cells.columns)), shape=shape, dtype=bool)
        dense_bins = np.full(shape, -1, dtype=np.int16)
        dense_bins[rows, cells.columns] = predicted
        out.layers["ddsc_bins"] = dense_bins
        out.layers["ddsc_imputed"] = sp.csr_matrix((expected.astype(np.float32), (rows, cells.columns)), shape=shape)
        out.uns["ddsc_impute"] = {
            "method": method,
            "steps": steps,
            "temperature": temperature,
            "seed": seed,
            "hidden_entries": int(cells.hidden.sum()),
            **self._gene_report(adata),
        }
        return out

    def _hide_matrix(self, adata, x: sp.csr_matrix, mask_fraction, mask, genes, seed) -> sp.csr_matrix:
        shape = (adata.n_obs, adata.n_vars)
        hide = sp.csr_matrix(shape, dtype=bool)
        if mask_fraction is not None:
            if not 0.0 < mask_fraction < 1.0:
                raise ValueError(f"mask_fraction must be in (0, 1), got {mask_fraction}")
            x = x.copy()
            x.eliminate_zeros()
            chosen = x.copy()
            chosen.data = np.random.default_rng(seed).random(x.nnz) < mask_fraction
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

    def _gene_report(self, adata) -> dict[str, int]:
        report = self.map_genes(adata).report()
        return {
            "genes": report["features"],
            "matched_genes": report["features"] - report["unmatched"] - report["duplicate_token"],
            "duplicate_genes": report["duplicate_token"],
        }

    # ---------------------------------------------------------------- embed
    def embed(self, adata, layer: str | None = None, seed: int = 0, round_counts: bool = False):
        """Cell embeddings of the clean cells. Output keys (``obsm``):

        - ``X_ddsc_labels`` [cells, labels]: the model as a classifier of the cell (the "diffusion classifier"
          of Li et al. 2023, arXiv:2303.16203): for every real label of every condition (``uns["ddsc_embed"]
          ["labels"]`` names the columns, ``"condition=label"``), the mean log-likelihood per gene of the cell's
          bins, each seeded half of its genes (``held_out_half``) hidden and predicted from the other half, with
          that label given and the other conditions null, centred over the labels of its condition. It reads
          the one thing training shapes, the masked-bin predictions under each condition; it carries cell state
          as far as the training labels describe it (a cell of an unseen cell line is placed relative to the
          seen ones) and is empty for a model without conditions.
        - ``X_ddsc_cls`` [cells, d_model]: the ``<cls>`` position's final hidden state, nothing masked, null
          conditions; ``X_ddsc_mean``: the final hidden states averaged over the cell's genes. No loss reaches
          these states (SUBS trains the final states of masked positions only); on the demo they separate
          nothing (the README's embedding table). Kept for comparison.

        Every gene a cell has in the vocabulary is used, deterministically: a cell longer than the model's
        ``max_genes`` is cut into chunks (``gene_chunks``, a function of ``seed`` and the cell's genes only, not
        of a training-time random subset) whose scores add up (``X_ddsc_labels``) or average (the others), every
        chunk seeing the bins of the whole cell. A cell with no matched non-zero gene gets zeros in
        ``X_ddsc_labels`` and ``X_ddsc_mean`` and the ``<cls>`` state of the empty cell
        (``uns["ddsc_embed"]["empty_cells"]``).
        """
        cells = self.entries(adata, self.counts(adata, layer, round_counts))
        n, width = cells.n_cells, self.config.d_model
        labels = [  # (cond column, label id, name) of every label of the label conditions
            (where.start, i, f"{spec.name}={label}")
            for spec, where in zip(self.specs, column_slices(self.specs), strict=True)
            if spec.kind == "label"
            for i, label in enumerate(self.labels.labels.get(spec.name, []), start=1)
        ]
        cls = torch.zeros(n, width, dtype=torch.float64)
        total = torch.zeros(n, width, dtype=torch.float64)
        chunks = torch.zeros(n, dtype=torch.float64)
        loglik = torch.zeros(n, len(labels), dtype=torch.float64)
        positions = torch.from_numpy(np.diff(cells.offsets)).double()
        held_out = torch.from_numpy(
            np.concatenate([np.zeros(0, bool)] + [held_out_half(cells.tokens[cells.cell(i)], seed) for i in range(n)])
        )
        null = self._cond({}, n)
        with self._bar(n, "embed") as bar, torch.no_grad(), self._autocast():
            for index, rows in self._row_batches(cells, null, seed):
                b = rows.batch
                h = self.model.hidden(b["gene_ids"], b["expr"], b["attention_mask"], b["cond"]).double().cpu()
                target = torch.from_numpy(index)[rows.cell]
                cls.index_add_(0, target, h[:, 0])
                chunks.index_add_(0, target, torch.ones(len(target), dtype=torch.float64))
                total.index_add_(0, target, (h * b["real"].cpu()[..., None]).sum(dim=1))
                half = ((rows.flat >= 0) & held_out[rows.flat.clamp(min=0)]).to(self.device)
                clean = b["expr"].clamp(max=self.config.num_bins - 1)[..., None]
                row_loglik = torch.zeros(len(target), len(labels), dtype=torch.float64)
                for hide in (half, b["real"] & ~half):  # each half predicted from the other: every gene once
                    expr = b["expr"].masked_fill(hide, self.tokens.mask)
                    for k, (column, label, _) in enumerate(labels):
                        cond = b["cond"].clone()  # null conditions but this label
                        cond[:, column] = label
                        logits = self.model(b["gene_ids"], expr, b["attention_mask"], cond)
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
            **self._gene_report(adata),
        }
        return out

    # ---------------------------------------------------------------- generate
    def panel_tokens(self, gene_panel: Sequence[str]) -> np.ndarray:
        """Token ids of a gene panel given by Ensembl ids and/or symbols; an error for unknown or repeated genes."""
        names = [str(g) for g in gene_panel]
        tokens = self.vocab.ids_for(names, names)
        unknown = [g for g, t in zip(names, tokens, strict=True) if t < 0]
        if unknown:
            raise ValueError(
                f"gene panel: {len(unknown)} of {len(names)} genes are not in the model's vocabulary "
                f"(matched {len(names) - len(unknown)}), e.g. {', '.join(unknown[:5])}"
            )
        if len(set(tokens.tolist())) != len(tokens):
            raise ValueError("gene panel: a gene is listed twice")
        if not 0 < len(tokens) <= self.max_length:
            raise ValueError(f"gene panel: {len(tokens)} genes; the model takes 1 to {self.max_length} per cell")
        return tokens

    def generate(
        self,
        gene_panel: Sequence[str],
        conditions: dict[str, Sequence[str]] | None = None,
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
        import anndata
        import pandas as pd

        tokens = torch.from_numpy(self.panel_tokens(gene_panel))
        conditions = {k: [str(v) for v in vals] for k, vals in (conditions or {}).items()}
        cond = self._cond(conditions, n_cells)
        generator = self._generator(seed)
        bins, nfe = [], 0
        with self._bar(n_cells, "generate") as bar, self._autocast():
            for start in range(0, n_cells, self.batch_size):
                count = min(self.batch_size, n_cells - start)
                batch = self._panel_batch(tokens, cond[start : start + count])
                keep = trajectory_gif is not None and start == 0
                out = sample(
                    self.model,
                    batch,
                    method=method,
                    steps=steps,
                    temperature=temperature,
                    guidance_scale=guidance_scale,
                    generator=generator,
                    return_trajectory=keep,
                    diffusion=self.diffusion,
                )
                if keep:
                    from ddsc.trajectory import save_trajectory_gif

                    save_trajectory_gif([x[:, 1:].cpu() for x in out.trajectory], self.tokens, trajectory_gif)
                bins.append(out.expr[:, 1:].cpu())
                nfe += out.nfe
                bar.update(count)
        obs = pd.DataFrame(
            {name: (vals * n_cells if len(vals) == 1 else vals) for name, vals in conditions.items()},
            index=[f"generated_{i}" for i in range(n_cells)],
        )
        row_of = {t: i for i, t in enumerate(self.vocab.token_ids.tolist())}
        where = [row_of[t] for t in tokens.tolist()]
        var = pd.DataFrame(
            {
                "token_id": tokens.numpy(),
                "ensembl_id": [self.vocab.ensembl_ids[i] for i in where],
                "symbol": [self.vocab.symbols[i] for i in where],
            },
            index=[str(g) for g in gene_panel],
        )
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

    def _panel_batch(self, tokens: Tensor, cond: Tensor) -> dict[str, Tensor]:
        n, length = len(cond), 1 + len(tokens)
        gene_ids = torch.cat([torch.full((n, 1), GENE_CLS), tokens.expand(n, -1)], dim=1)
        expr = torch.full((n, length), self.tokens.mask)
        expr[:, 0] = self.tokens.cls
        real = torch.ones(n, length, dtype=torch.bool)
        real[:, 0] = False
        batch = {
            "gene_ids": gene_ids,
            "expr": expr,
            "attention_mask": torch.ones(n, length, dtype=torch.bool),
            "real": real,
        }
        return {**{k: v.to(self.device) for k, v in batch.items()}, "cond": cond}


def _autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where it is fast and supported (CUDA with bf16), fp32 otherwise; ``bf16`` forces it."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
