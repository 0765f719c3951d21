"""Gene vocabulary: token id <-> Ensembl id <-> symbol.

Built from Tahoe-100M's ``gene_metadata.parquet`` so that Tahoe token ids map to themselves (no remapping of
100M cells), with ``<pad>``/``<cls>``/``<eoc>`` at 0/1/2 as in ``ddsc.data.tokens``. Other sources (h5ad,
10x) are mapped onto it by Ensembl id (version suffix ignored), falling back to the gene symbol where the
symbol names exactly one gene. The model's gene embedding table has ``len(vocab)`` rows.

JSON layout (no pickle)::

    {"format": "ddsc-gene-vocab/1", "specials": {"<pad>": 0, "<cls>": 1, "<eoc>": 2},
     "genes": [[token_id, ensembl_id, symbol], ...]}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ddsc.data.tokens import FIRST_GENE_ID, GENE_SPECIALS

FORMAT = "ddsc-gene-vocab/1"


def strip_version(ensembl_id: str) -> str:
    """``ENSG00000141510.17`` -> ``ENSG00000141510``: annotation releases bump the suffix, not the gene."""
    return ensembl_id.split(".", 1)[0] if ensembl_id.startswith("ENS") else ensembl_id


class GeneVocab:
    """Genes with explicit token ids (>= FIRST_GENE_ID, unique); ids need not be contiguous."""

    def __init__(self, token_ids: Sequence[int], ensembl_ids: Sequence[str], symbols: Sequence[str]):
        self.token_ids = np.asarray(token_ids, dtype=np.int64)
        self.ensembl_ids = [str(e) for e in ensembl_ids]
        self.symbols = [str(s) for s in symbols]
        if not (len(self.token_ids) == len(self.ensembl_ids) == len(self.symbols)):
            raise ValueError("gene vocab: token_ids, ensembl_ids and symbols must have the same length")
        if len(self.token_ids) and self.token_ids.min() < FIRST_GENE_ID:
            raise ValueError(f"gene vocab: gene token ids must be >= {FIRST_GENE_ID} (0-2 are special tokens)")
        if len(np.unique(self.token_ids)) != len(self.token_ids):
            raise ValueError("gene vocab: duplicate token ids")
        self._by_ensembl: dict[str, int] = {}
        for tid, ens in zip(self.token_ids.tolist(), self.ensembl_ids, strict=True):
            if ens:
                self._by_ensembl.setdefault(strip_version(ens), tid)
        # A symbol is a valid key only when it names exactly one gene (symbols are reused across loci).
        by_symbol: dict[str, list[int]] = {}
        for tid, sym in zip(self.token_ids.tolist(), self.symbols, strict=True):
            if sym:
                by_symbol.setdefault(sym, []).append(tid)
        self._by_symbol = {sym: ids[0] for sym, ids in by_symbol.items() if len(ids) == 1}

    def __len__(self) -> int:
        """Max token id + 1: the size of the gene embedding table (``ModelConfig.gene_vocab_size``)."""
        return int(self.token_ids.max()) + 1 if len(self.token_ids) else FIRST_GENE_ID

    @property
    def num_genes(self) -> int:
        return len(self.token_ids)

    def known_mask(self) -> np.ndarray:
        """Boolean table over ``range(len(self))``: True at real gene token ids (fast vectorised lookup)."""
        mask = np.zeros(len(self), dtype=bool)
        mask[self.token_ids] = True
        return mask

    def ids_for(self, ensembl_ids: Sequence[str] | None, symbols: Sequence[str] | None = None) -> np.ndarray:
        """Token ids (int64) for features given by Ensembl id, falling back to a unique symbol; -1 if unknown."""
        n = len(ensembl_ids) if ensembl_ids is not None else len(symbols or ())
        out = np.full(n, -1, dtype=np.int64)
        for i in range(n):
            if ensembl_ids is not None and ensembl_ids[i]:
                out[i] = self._by_ensembl.get(strip_version(str(ensembl_ids[i])), -1)
            if out[i] < 0 and symbols is not None and symbols[i]:
                out[i] = self._by_symbol.get(str(symbols[i]), -1)
        return out

    @classmethod
    def from_gene_metadata(cls, path: str | Path) -> GeneVocab:
        """Read Tahoe-100M ``gene_metadata.parquet`` (``gene_symbol``, ``ensembl_id``, ``token_id``)."""
        import pyarrow.parquet as pq

        from ddsc.data.remote import open_input

        with open_input(str(path)) as f:
            table = pq.read_table(f)
        missing = {"gene_symbol", "ensembl_id", "token_id"} - set(table.column_names)
        if missing:
            raise ValueError(f"{path}: gene metadata lacks column(s) {sorted(missing)}")
        tokens = table.column("token_id").to_numpy().astype(np.int64)
        keep = tokens >= FIRST_GENE_ID  # some releases list the special tokens too; they are fixed here
        ens = [e or "" for e in table.column("ensembl_id").to_pylist()]
        sym = [s or "" for s in table.column("gene_symbol").to_pylist()]
        idx = np.flatnonzero(keep)
        return cls(tokens[idx], [ens[i] for i in idx], [sym[i] for i in idx])

    @classmethod
    def from_features(cls, ensembl_ids: Sequence[str], symbols: Sequence[str]) -> GeneVocab:
        """A fresh vocabulary for a non-Tahoe source: features numbered from FIRST_GENE_ID in the given order."""
        ids = np.arange(FIRST_GENE_ID, FIRST_GENE_ID + len(ensembl_ids), dtype=np.int64)
        return cls(ids, ensembl_ids, symbols)

    @classmethod
    def from_json(cls, path: str | Path) -> GeneVocab:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"gene vocabulary not found: {path}")
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a gene vocabulary (expected format {FORMAT!r})")
        if data.get("specials") != GENE_SPECIALS:
            raise ValueError(f"{path}: special tokens {data.get('specials')} differ from {GENE_SPECIALS}")
        genes = data["genes"]
        return cls([g[0] for g in genes], [g[1] for g in genes], [g[2] for g in genes])

    def to_json(self, path: str | Path) -> None:
        genes = [
            [int(t), e, s] for t, e, s in zip(self.token_ids.tolist(), self.ensembl_ids, self.symbols, strict=True)
        ]
        payload = {"format": FORMAT, "specials": GENE_SPECIALS, "genes": genes}
        Path(path).write_text(json.dumps(payload, separators=(",", ":")))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, GeneVocab)
            and np.array_equal(self.token_ids, other.token_ids)
            and self.ensembl_ids == other.ensembl_ids
            and self.symbols == other.symbols
        )

    def __repr__(self) -> str:
        return f"GeneVocab({self.num_genes} genes, size {len(self)})"
