"""AnnData / 10x count matrices -> validated cell batches on a given gene vocabulary.

Features are mapped to token ids by Ensembl id (version ignored), then by a unique symbol; unmatched
features are dropped and counted, and two features landing on one token keep the first (counted too).
Values must be raw integer counts: normalised or scaled data (non-integer or negative values) stops the
conversion with a message naming the cell and gene, unless ``round_counts`` is set explicitly (the rule of
``ddsc.data.raw_counts``, which model use applies too).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ddsc.data.cells import CellBatch, reject_codes, validate
from ddsc.data.mds_convert import WriteOptions, convert, fingerprint
from ddsc.data.raw_counts import check_raw_counts, gene_names
from ddsc.data.readers import CountMatrix, open_counts
from ddsc.data.schema import METADATA_COLUMNS
from ddsc.data.vocab import GeneVocab


@dataclass
class FeatureMapping:
    tokens: np.ndarray  # int64 per feature, -1 = dropped
    matched_ensembl: int
    matched_symbol: int
    duplicates: int

    def report(self) -> dict[str, int]:
        return {
            "features": len(self.tokens),
            "matched_by_ensembl": self.matched_ensembl,
            "matched_by_symbol": self.matched_symbol,
            "duplicate_token": self.duplicates,
            "unmatched": int(np.count_nonzero(self.tokens < 0)) - self.duplicates,
        }


def map_features(vocab: GeneVocab, ensembl_ids: list[str], symbols: list[str]) -> FeatureMapping:
    by_ensembl = vocab.ids_for(ensembl_ids, None)
    tokens = vocab.ids_for(ensembl_ids, symbols)
    _, first = np.unique(tokens, return_index=True)
    repeated = np.ones(len(tokens), dtype=bool)
    repeated[first] = False
    repeated &= tokens >= 0
    tokens[repeated] = -1
    matched = tokens >= 0
    return FeatureMapping(
        tokens,
        int(np.count_nonzero(matched & (by_ensembl >= 0))),
        int(np.count_nonzero(matched & (by_ensembl < 0))),
        int(np.count_nonzero(repeated)),
    )


@dataclass
class AnnDataSource:
    vocab: GeneVocab
    layer: str = "X"
    obs_columns: dict[str, str] = field(default_factory=dict)  # schema column -> obs column
    round_counts: bool = False
    chunk_size: int = 2048

    suffix = ""

    def count_cells(self, path: str) -> int:
        with open_counts(path, self.layer) as m:
            return m.n_cells

    def mapping(self, matrix: CountMatrix) -> FeatureMapping:
        return map_features(self.vocab, matrix.ensembl_ids, matrix.symbols)

    def batches(self, path: str) -> Iterator[CellBatch]:
        known = self.vocab.known_mask()
        source = os.path.basename(path.rstrip("/"))
        with open_counts(path, self.layer) as matrix:
            tokens = self.mapping(matrix).tokens
            obs = self._obs(matrix)
            genes = gene_names(matrix.ensembl_ids, matrix.symbols)
            for start in range(0, matrix.n_cells, self.chunk_size):
                stop = min(start + self.chunk_size, matrix.n_cells)
                offsets, features, values = matrix.rows(start, stop)
                cells = matrix.obs_names[start:stop]
                values = check_raw_counts(
                    np.asarray(values), offsets, features, cells, genes, matrix.path, self.round_counts
                )
                metadata = {col: obs[col][start:stop] for col in METADATA_COLUMNS}
                metadata["source"] = [source] * (stop - start)
                cell_ids = [f"{source}:{i}" for i in range(start, stop)]
                yield validate(tokens[features], values, offsets, known, reject_codes(stop - start), cell_ids, metadata)

    def _obs(self, matrix: CountMatrix) -> dict[str, list[str]]:
        blank = [""] * matrix.n_cells
        obs = {col: matrix.obs.get(self.obs_columns.get(col, col), blank) for col in METADATA_COLUMNS}
        missing = sorted(set(self.obs_columns.values()) - set(matrix.obs))
        if missing:
            raise KeyError(f"{matrix.path}: obs has no column(s) {missing} (has {sorted(matrix.obs)})")
        obs["barcode"] = matrix.obs_names
        return obs


def convert_anndata(
    inputs: list[str], vocab: GeneVocab, out: str, source: AnnDataSource, options: WriteOptions
) -> dict:
    """Convert h5ad / 10x inputs into MDS splits; prints and records how many features matched the vocab."""
    report = {}
    for path in inputs:
        name = os.path.basename(path.rstrip("/"))
        with open_counts(path, source.layer) as matrix:
            report[name] = source.mapping(matrix).report()
        print(f"{name}: genes matched {report[name]}")
    key = fingerprint(
        source.vocab.token_ids, source.vocab.ensembl_ids, source.layer, source.obs_columns, source.round_counts
    )
    return convert(inputs, source, key, vocab, out, options, extra={"feature_mapping": report})
