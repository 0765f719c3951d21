"""Gene vocabulary: Tahoe token ids preserved, lookups by Ensembl id / symbol, JSON round trip."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ddsc.data.vocab import GeneVocab


def test_from_gene_metadata_keeps_token_ids_and_round_trips(tmp_path):
    pq.write_table(
        pa.table(
            {
                "gene_symbol": ["<pad>", "<cls>", "A1BG", "TP53", "MT-CO1"],
                "ensembl_id": ["", "", "ENSG00000121410", "ENSG00000141510", "ENSG00000198804"],
                "token_id": [0, 1, 3, 7, 62712],
            }
        ),
        tmp_path / "gene_metadata.parquet",
    )
    vocab = GeneVocab.from_gene_metadata(tmp_path / "gene_metadata.parquet")
    assert vocab.token_ids.tolist() == [3, 7, 62712]  # special rows dropped, ids untouched
    assert len(vocab) == 62713
    assert np.flatnonzero(vocab.known_mask()).tolist() == [3, 7, 62712]
    vocab.to_json(tmp_path / "vocab.json")
    assert GeneVocab.from_json(tmp_path / "vocab.json") == vocab


def test_ids_for_ensembl_version_then_unique_symbol():
    vocab = GeneVocab([3, 4, 5, 6], ["ENSG01", "ENSG02", "ENSG03", "ENSG04"], ["A", "B", "DUP", "DUP"])
    ids = vocab.ids_for(["ENSG02.7", "ENSMUSG9", "", "", "ENSG04"], ["x", "A", "DUP", "nothing", "A"])
    # version stripped; symbol fallback; ambiguous symbol refused; Ensembl wins over a conflicting symbol
    assert ids.tolist() == [4, 3, -1, -1, 6]
    assert vocab.ids_for(None, ["B", "C"]).tolist() == [4, -1]


def test_invalid_vocabularies_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match=">= 3"):
        GeneVocab([2], ["E"], ["S"])
    with pytest.raises(ValueError, match="duplicate token ids"):
        GeneVocab([3, 3], ["E1", "E2"], ["S1", "S2"])
    (tmp_path / "bad.json").write_text('{"genes": []}')
    with pytest.raises(ValueError, match="not a gene vocabulary"):
        GeneVocab.from_json(tmp_path / "bad.json")
