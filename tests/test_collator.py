"""CellCollator: layout of the batch, whole-cell binning, random subsets, zero genes, condition labels."""

import numpy as np
import pytest
import torch

from ddsc.data.binning import quantile_bins_reference
from ddsc.data.binning_config import BinningConfig
from ddsc.data.collator import CellCollator
from ddsc.data.labels import LabelVocab
from ddsc.data.tokens import GENE_CLS, GENE_PAD, ExpressionTokens

VOCAB = 500
BINNING = BinningConfig(method="quantile", num_bins=7)
TOKENS = ExpressionTokens(7)


def make_cell(rng: np.random.Generator, n: int, **metadata) -> dict:
    genes = rng.choice(np.arange(3, VOCAB), n, replace=False).astype(np.int32)
    counts = (rng.negative_binomial(1, 0.3, n) + 1).astype(np.int32)
    return {"genes": genes, "counts": counts, "cell_id": f"c{n}", **metadata}


def reference_bins(cell: dict, cfg: BinningConfig = BINNING) -> dict[int, int]:
    """gene id -> bin, binning the whole cell with the per-cell torch.quantile reference."""
    bins = quantile_bins_reference(torch.from_numpy(cell["counts"]).float(), cfg)
    return dict(zip(cell["genes"].tolist(), bins.tolist(), strict=True))


def test_short_cells_keep_order_and_padding():
    rng = np.random.default_rng(0)
    cells = [make_cell(rng, n) for n in (3, 8, 0)]
    batch = CellCollator(max_length=10, binning=BINNING)(cells)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()} == {
        "gene_ids": (torch.int64, (3, 9)),
        "expr": (torch.int64, (3, 9)),
        "counts": (torch.float32, (3, 9)),
        "real": (torch.bool, (3, 9)),
        "attention_mask": (torch.bool, (3, 9)),
        "cond": (torch.int64, (3, 0)),
    }
    assert (batch["gene_ids"][:, 0] == GENE_CLS).all() and (batch["expr"][:, 0] == TOKENS.cls).all()
    for i, cell in enumerate(cells):
        n = len(cell["genes"])
        assert batch["gene_ids"][i, 1 : n + 1].tolist() == cell["genes"].tolist()
        assert batch["counts"][i, 1 : n + 1].tolist() == cell["counts"].tolist()
        assert batch["expr"][i, 1 : n + 1].tolist() == list(reference_bins(cell).values())
        assert batch["real"][i].tolist() == [False] + [True] * n + [False] * (8 - n)
        assert (batch["gene_ids"][i, n + 1 :] == GENE_PAD).all() and (batch["expr"][i, n + 1 :] == TOKENS.pad).all()
    assert torch.equal(batch["attention_mask"][:, 1:], batch["real"][:, 1:]) and batch["attention_mask"][:, 0].all()


@pytest.mark.parametrize("dtypes", [(np.uint16, np.uint16, np.uint16), (np.uint16, np.int32, np.uint16)])
def test_counts_stored_as_uint16_or_int32_give_the_same_batch(dtypes):
    """MDS stores counts as uint16 (int32 for a batch with a larger count): the batch must not depend on it."""
    rng = np.random.default_rng(4)
    cells = [make_cell(rng, n) for n in (5, 9, 3)]
    stored = [cell | {"counts": cell["counts"].astype(dtype)} for cell, dtype in zip(cells, dtypes, strict=True)]
    expected, got = (CellCollator(max_length=6, binning=BINNING, seed=0)(c) for c in (cells, stored))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_long_cells_get_a_uniform_random_subset_binned_on_the_whole_cell():
    rng = np.random.default_rng(1)
    cell = make_cell(rng, 40)
    collator = CellCollator(max_length=10, binning=BINNING, seed=3)
    expected_bins = reference_bins(cell)
    seen = np.zeros(VOCAB)
    for _ in range(400):
        batch = collator([cell, make_cell(rng, 4)])
        assert batch["gene_ids"].shape == (2, 11)
        genes = batch["gene_ids"][0, 1:].tolist()
        assert len(set(genes)) == 10 and set(genes) <= set(cell["genes"].tolist())
        assert batch["expr"][0, 1:].tolist() == [expected_bins[g] for g in genes]
        count_of = dict(zip(cell["genes"].tolist(), cell["counts"].tolist(), strict=True))
        assert batch["counts"][0, 1:].tolist() == [count_of[g] for g in genes]
        seen[genes] += 1
    # Each of the 40 genes is kept with probability 1/4: 100 of 400 draws, sd ~8.7.
    frequencies = seen[cell["genes"]]
    assert np.abs(frequencies - 100).max() < 40


def test_same_seed_same_batch_different_seed_differs():
    rng = np.random.default_rng(2)
    cells = [make_cell(rng, 50) for _ in range(4)]
    a, b, c = (CellCollator(8, BINNING, seed=s)(cells) for s in (5, 5, 6))
    assert torch.equal(a["gene_ids"], b["gene_ids"]) and not torch.equal(a["gene_ids"], c["gene_ids"])


def test_zero_genes_are_unexpressed_distinct_and_bin_zero():
    cfg = BinningConfig(method="quantile", num_bins=7, zero_fraction=0.25)
    rng = np.random.default_rng(3)
    cells = [make_cell(rng, n) for n in (30, 60)]
    batch = CellCollator(max_length=1000, binning=cfg, gene_vocab_size=VOCAB, seed=0)(cells)
    for i, cell in enumerate(cells):
        real = batch["real"][i]
        genes, expr, counts = batch["gene_ids"][i][real], batch["expr"][i][real], batch["counts"][i][real]
        zero = counts == 0
        assert len(set(genes.tolist())) == len(genes)  # no gene twice
        assert not set(genes[zero].tolist()) & set(cell["genes"].tolist())
        assert (expr[zero] == 0).all() and (expr[~zero] >= 1).all()
        assert int(zero.sum()) == round(len(cell["genes"]) / 3)  # f / (1 - f) = 1/3 zero genes per expressed gene
        expected = reference_bins(cell, cfg)
        assert expr[~zero].tolist() == [expected[g] for g in genes[~zero].tolist()]


def test_condition_labels_and_vocab_round_trip(tmp_path):
    vocab = LabelVocab({"drug": ["DMSO_TF", "Taxol"], "cell_line_id": ["CVCL_0023", "CVCL_0480", "CVCL_1056"]})
    vocab.to_json(tmp_path / "labels.json")
    vocab = LabelVocab.from_json(tmp_path / "labels.json")
    rng = np.random.default_rng(4)
    cells = [
        make_cell(rng, 3, drug="Taxol", cell_line_id="CVCL_1056"),
        make_cell(rng, 3, drug="", cell_line_id="CVCL_0023"),
        make_cell(rng, 3, drug="unseen", cell_line_id="CVCL_0480"),
    ]
    batch = CellCollator(4, BINNING, labels=vocab, conditions=("cell_line_id", "drug"))(cells)
    assert batch["cond"].tolist() == [[3, 2], [1, 0], [2, 0]]
    assert vocab.decode("drug", [0, 1, 2]) == ["", "DMSO_TF", "Taxol"]
    assert vocab.num_labels("cell_line_id") == 3


def test_bad_configuration_fails_early():
    with pytest.raises(ValueError, match="label vocabulary"):
        CellCollator(4, BINNING, conditions=("drug",))
    with pytest.raises(KeyError, match="plate"):
        CellCollator(4, BINNING, labels=LabelVocab({"drug": ["a"]}), conditions=("plate",))
    with pytest.raises(ValueError, match="gene_vocab_size"):
        CellCollator(4, BinningConfig(zero_fraction=0.1))


def test_bins_for_matches_collator():
    rng = np.random.default_rng(5)
    cell = make_cell(rng, 20)
    collator = CellCollator(max_length=32, binning=BINNING)
    batch = collator([cell])
    counts = torch.from_numpy(cell["counts"]).float()[None, :]
    tokens = collator.bins_for(torch.cat([counts, torch.zeros(1, 3)], 1), torch.arange(23)[None, :] < 20)
    assert torch.equal(tokens[0, :20], batch["expr"][0, 1:]) and (tokens[0, 20:] == TOKENS.pad).all()
