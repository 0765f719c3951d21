"""A loaded export folder plus what every inference task needs to feed it: vocab, labels, binning, conditions.

The tasks (``imputation``, ``embedding``, ``generation``) are functions over a ``LoadedModel``; ``Predictor``
(``ddsc.inference``) binds them as methods.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm.auto import tqdm

from ddsc.config import from_dict
from ddsc.data.binning_config import BinningConfig
from ddsc.data.collator import CellCollator
from ddsc.data.labels import LabelVocab
from ddsc.data.schema import METADATA_COLUMNS
from ddsc.data.vocab import GeneVocab
from ddsc.diffusion.config import DiffusionConfig
from ddsc.errors import InputError
from ddsc.inference.anndata_input import cell_entries, gene_report, map_genes, obs_conditions, raw_counts
from ddsc.inference.rows import CellEntries, RowBatch, model_rows
from ddsc.model.conditions import ConditionValueError, encode_conditions
from ddsc.model.export import LABELS_FILE, REQUIRED_FILES, VOCAB_FILE, WEIGHTS_FILE, check_labels
from ddsc.model.hf import DDSCConfig, DDSCModel
from ddsc.precision import autocast

Precision = Literal["auto", "fp32", "bf16"]
Conditions = dict[str, Sequence[str]]


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


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where it is fast and supported (CUDA with bf16), fp32 otherwise; ``bf16`` forces it."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


class LoadedModel:
    """A model plus everything needed to feed it user data (vocab, labels, binning, diffusion)."""

    model_class = DDSCModel  # what ``from_pretrained`` loads (another family's subclass names its own)

    family = "masked"  # the model family (``ddsc.inference.latent`` is the other)

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
        self.max_length = self.config.max_genes
        self.conditions = self.config.condition_names
        self.autocast_dtype = autocast_dtype(precision, self.device)
        self.batch_size = batch_size
        self.progress = progress
        self.setup_family()

    def setup_family(self) -> None:
        """What this family needs beyond the shared part: for the masked model its binning, diffusion and a
        collator that bins user counts exactly as in training (``bins_for``); conditions are encoded by
        ``encode``."""
        self.specs = self.config.model_config().conditions
        self.binning = from_dict(BinningConfig, self.config.binning)
        self.diffusion = from_dict(DiffusionConfig, self.config.diffusion)
        self.tokens = self.config.tokens
        self.collator = self.data_collator()

    def data_collator(self) -> CellCollator:
        """A collator that bins and labels cells exactly as the model's training data were (``self.binning``)."""
        return CellCollator(
            self.max_length, self.binning, self.labels, self.specs, gene_vocab_size=self.config.gene_vocab_size
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str = "cpu", precision: Precision = "auto", **kwargs):
        folder = check_model_folder(model_dir)
        return cls(
            cls.model_class.from_pretrained(folder),
            GeneVocab.from_json(folder / VOCAB_FILE),
            LabelVocab.from_json(folder / LABELS_FILE),
            device=device,
            precision=precision,
            **kwargs,
        )

    # ---------------------------------------------------------------- AnnData
    def cells(self, adata, layer: str | None = None, round_counts: bool = False, hide=None) -> CellEntries:
        """The cells' entries: matched non-zero genes, plus ``hide(x)``'s entries when given (to predict)."""
        x = raw_counts(adata, layer, round_counts)
        cells = cell_entries(map_genes(self.vocab, adata), x, None if hide is None else hide(x))
        cells.counts[cells.hidden] = 0.0
        return cells

    def panel(self, gene_panel: Sequence[str]) -> np.ndarray:
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
        return tokens

    def generated_frames(
        self, conditions: dict[str, list[str]], n_cells: int, tokens: np.ndarray, gene_panel: Sequence[str]
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``obs`` (the conditions, one value or one per cell) and ``var`` (token id, Ensembl id, symbol of each
        panel gene) of ``n_cells`` generated cells, for either family's ``generate``."""
        obs = pd.DataFrame(
            {name: (vals * n_cells if len(vals) == 1 else vals) for name, vals in conditions.items()},
            index=[f"generated_{i}" for i in range(n_cells)],
        )
        row_of = {t: i for i, t in enumerate(self.vocab.token_ids.tolist())}
        where = [row_of[t] for t in np.asarray(tokens).tolist()]
        var = pd.DataFrame(
            {
                "token_id": np.asarray(tokens),
                "ensembl_id": [self.vocab.ensembl_ids[i] for i in where],
                "symbol": [self.vocab.symbols[i] for i in where],
            },
            index=[str(g) for g in gene_panel],
        )
        return obs, var

    def gene_report(self, adata) -> dict[str, int]:
        return gene_report(map_genes(self.vocab, adata))

    def samples_from_anndata(
        self, adata, layer: str | None = None, round_counts: bool = False
    ) -> tuple[list[dict], int]:
        """MDS-style samples (cell_id = obs name, genes, counts, and as strings the obs columns that are model
        conditions or MDS metadata columns) and the number of matched genes."""
        cells = self.cells(adata, layer, round_counts)
        obs = adata.obs
        columns = [col for col in dict.fromkeys([*self.conditions, *METADATA_COLUMNS]) if col in obs]
        samples = []
        for i in range(cells.n_cells):
            s = cells.cell(i)
            samples.append(
                {
                    "cell_id": str(adata.obs_names[i]),
                    "genes": cells.tokens[s].astype(np.int32),
                    "counts": cells.counts[s],
                    **{col: str(obs[col].iloc[i]) for col in columns},
                }
            )
        return samples, int(np.count_nonzero(map_genes(self.vocab, adata).tokens >= 0))

    # ---------------------------------------------------------------- conditions
    def encode(self, columns: Conditions, n: int) -> Tensor:
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

    def cell_conditions(self, adata, conditions: Conditions | None) -> tuple[Tensor, dict]:
        """The conditions of ``adata``'s cells and a report: by default read from ``obs`` (``obs_conditions``:
        unknown labels become null and are counted); ``conditions`` overrides (``{}``: all null)."""
        if conditions is not None:
            return self.encode(conditions, adata.n_obs), {"source": "given", "columns": sorted(conditions)}
        values, unknown = obs_conditions(adata, self.specs, self.labels)
        report = {"source": "obs", "columns": sorted(values), "unknown_labels": unknown}
        return self.encode(values, adata.n_obs), report

    # ---------------------------------------------------------------- running
    def row_batches(self, cells: CellEntries, cond: Tensor, seed: int) -> Iterator[tuple[np.ndarray, RowBatch]]:
        """Cell batches (their indices) and their model rows; long cells split into chunks (``gene_chunks``)."""
        for start in range(0, cells.n_cells, self.batch_size):
            index = np.arange(start, min(start + self.batch_size, cells.n_cells))
            yield index, model_rows(cells, index, cond[index], self.collator, self.max_length, seed).to(self.device)

    def autocast(self) -> AbstractContextManager:
        return autocast(self.device.type, self.autocast_dtype)

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="cell", disable=not self.progress)
