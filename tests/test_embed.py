"""Cell embeddings (``Predictor.embed``): deterministic whole-cell chunks and the label-likelihood embedding."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from ddsc.data.binning_config import BinningConfig
from ddsc.data.collator import CellCollator
from ddsc.data.labels import LabelVocab
from ddsc.data.tokens import GENE_CLS, ExpressionTokens
from ddsc.data.vocab import GeneVocab
from ddsc.diffusion.config import DiffusionConfig
from ddsc.diffusion.masked_diffusion import MaskedDiffusion
from ddsc.eval.embedding import label_scores
from ddsc.inference import Predictor, gene_chunks, held_out_half
from ddsc.model.export import write_hf_folder
from ddsc.model.hf import DDSCConfig, DDSCModel

K = 8
TOKENS = ExpressionTokens(K)
N_GENES = 40  # vocabulary genes 3..42
VOCAB = N_GENES + 3
LABELS = LabelVocab({"population": ["A", "B"], "batch": ["b1", "b2", "b3"]})


def make_model(max_genes: int = 16, seed: int = 0, random_weights: bool = True, dropout: float = 0.1) -> DDSCModel:
    torch.manual_seed(seed)
    config = DDSCConfig(
        d_model=32,
        n_layers=2,
        n_heads=4,
        num_bins=K,
        gene_vocab_size=VOCAB,
        max_genes=max_genes,
        conditions=[{"name": "population", "dropout": dropout, "num_labels": 2}, {"name": "batch", "num_labels": 3}],
        binning={"num_bins": K},
    )
    model = DDSCModel(config)
    if random_weights:  # DiT's zero init makes every block the identity and the logits zero: make them all work
        for module in model.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
                torch.nn.init.normal_(module.weight, std=0.3)
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.bias, std=0.3)
    return model.eval()


def save(model: DDSCModel, folder) -> str:
    vocab = GeneVocab.from_features([f"ENSG{i:011d}" for i in range(N_GENES)], [f"G{i}" for i in range(N_GENES)])
    write_hf_folder(model, folder, vocab, LABELS)
    return str(folder)


def make_adata(counts: np.ndarray) -> anndata.AnnData:
    var = pd.DataFrame(
        {"gene_symbols": [f"G{i}" for i in range(N_GENES)]}, index=[f"ENSG{i:011d}" for i in range(N_GENES)]
    )
    obs = pd.DataFrame(index=[f"c{i}" for i in range(len(counts))])
    return anndata.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)


def random_counts(n_cells: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.uniform(0.3, 6.0, size=(n_cells, N_GENES))).astype(np.float32)
    return x + (x > 0) * rng.integers(0, 3, size=x.shape)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save(make_model(), tmp_path_factory.mktemp("embed") / "hf")


# ------------------------------------------------------------------------------ chunks and held-out genes


def test_gene_chunks_use_every_gene_once_whatever_their_order():
    tokens = np.arange(3, 303)
    chunks = gene_chunks(tokens, 128, seed=0)
    assert [len(c) for c in chunks] == [100, 100, 100]  # ceil(300 / 128) = 3 chunks of near-equal size
    np.testing.assert_array_equal(np.sort(np.concatenate(chunks)), np.arange(300))
    shuffled = np.random.default_rng(0).permutation(tokens)
    for a, b in zip(chunks, gene_chunks(shuffled, 128, seed=0), strict=True):
        np.testing.assert_array_equal(tokens[a], shuffled[b])  # the same genes, in the same order
    other_seed = gene_chunks(tokens, 128, seed=1)
    assert not np.array_equal(tokens[chunks[0]], tokens[other_seed[0]])
    other_cell = gene_chunks(tokens[1:], 128, seed=0)  # another gene set is cut another way
    assert len(set(tokens[chunks[0]]) & set(tokens[1:][other_cell[0]])) < 60
    assert [len(c) for c in gene_chunks(tokens[:128], 128, seed=0)] == [128]  # a cell that fits: one chunk


def test_held_out_half_is_half_of_every_chunk_whatever_the_gene_order():
    tokens = np.arange(3, 1003)
    half = held_out_half(tokens, seed=0)
    assert 450 < half.sum() < 550
    for part in gene_chunks(tokens, 128, seed=0):  # independent of the chunks' cut: about half of each chunk
        assert 0.3 < half[part].mean() < 0.7
    order = np.random.default_rng(0).permutation(len(tokens))
    np.testing.assert_array_equal(held_out_half(tokens[order], seed=0), half[order])
    assert (held_out_half(tokens, seed=1) != half).mean() > 0.4


# ------------------------------------------------------------------------------------------- ddsc embed


def test_embed_is_deterministic_gene_order_invariant_and_independent_of_the_batch(model_dir):
    counts = random_counts(9)
    assert (np.count_nonzero(counts, axis=1) > 16).all()  # every cell is cut into chunks (max_genes 16)
    predictor = Predictor.from_pretrained(model_dir, progress=False, batch_size=4)
    out = predictor.embed(make_adata(counts))
    assert out.uns["ddsc_embed"]["labels"] == ["population=A", "population=B", "batch=b1", "batch=b2", "batch=b3"]
    first = out.obsm["X_ddsc_labels"]
    assert first.shape == (9, 5) and np.abs(first).max() > 0.05  # the labels change the predictions
    np.testing.assert_allclose(first[:, :2].sum(1), 0, atol=1e-6)  # centred per condition
    np.testing.assert_allclose(first[:, 2:].sum(1), 0, atol=1e-6)
    torch.manual_seed(123)  # no hidden use of the global RNGs
    np.random.seed(123)
    again = predictor.embed(make_adata(counts))
    for key in ("X_ddsc_labels", "X_ddsc_cls", "X_ddsc_mean"):
        np.testing.assert_array_equal(again.obsm[key], out.obsm[key])
    order = np.random.default_rng(1).permutation(N_GENES)
    permuted = predictor.embed(make_adata(counts)[:, order].copy())
    alone = Predictor.from_pretrained(model_dir, progress=False, batch_size=1).embed(make_adata(counts[5:6]))
    for key in ("X_ddsc_labels", "X_ddsc_cls", "X_ddsc_mean"):
        np.testing.assert_allclose(permuted.obsm[key], out.obsm[key], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(alone.obsm[key][0], out.obsm[key][5], rtol=1e-5, atol=1e-6)
    other_seed = predictor.embed(make_adata(counts), seed=1).obsm["X_ddsc_labels"]
    assert not np.allclose(other_seed, first)  # other chunks and held-out genes ...
    assert np.corrcoef(other_seed.ravel(), first.ravel())[0, 1] > 0.5  # ... about the same embedding


def test_long_cell_embedding_uses_all_its_genes_not_a_training_subset(model_dir):
    """A 37-gene cell on a 16-gene model: its embedding is the explicit sum over the deterministic chunks of all
    its genes, whatever random subset the training collator draws (here: several draws)."""
    counts = random_counts(1, seed=2)
    predictor = Predictor.from_pretrained(model_dir, progress=False)
    embedded = predictor.embed(make_adata(counts), seed=4).obsm["X_ddsc_labels"][0]
    genes = np.flatnonzero(counts[0])
    tokens = genes + 3
    values = torch.from_numpy(counts[0, genes])[None]
    bins = predictor.collator.bins_for(values, torch.ones_like(values, dtype=torch.bool))[0]  # the whole cell's
    hide = torch.from_numpy(held_out_half(tokens, seed=4))
    chunks = gene_chunks(tokens, 16, seed=4)
    assert len(chunks) == int(np.ceil(len(genes) / 16)) == 3
    loglik = torch.zeros(5, dtype=torch.float64)
    for part in chunks:
        gene_ids = torch.tensor([GENE_CLS, *tokens[part]])[None]
        clean = torch.cat([torch.tensor([0]), bins[part]])[None]
        for hidden in (hide[part], ~hide[part]):  # each half predicted from the other
            hidden = torch.cat([torch.tensor([False]), hidden])[None]
            expr = torch.cat([torch.tensor([TOKENS.cls]), bins[part]])[None].masked_fill(hidden, TOKENS.mask)
            for k, cond in enumerate([[1, 0], [2, 0], [0, 1], [0, 2], [0, 3]]):
                with torch.no_grad():
                    logits = predictor.model(gene_ids, expr, torch.ones_like(hidden), torch.tensor([cond]))
                loglik[k] += (logits.log_softmax(-1).gather(-1, clean[..., None])[..., 0] * hidden).sum().double()
    per_gene = loglik / len(genes)
    expected = torch.cat([per_gene[:2] - per_gene[:2].mean(), per_gene[2:] - per_gene[2:].mean()])
    np.testing.assert_allclose(embedded, expected.numpy(), rtol=1e-4, atol=1e-6)
    draws = [  # training sees a random 16-gene subset, another one per collator seed (epoch, rank, worker) ...
        CellCollator(16, predictor.binning, seed=s)([{"genes": tokens, "counts": counts[0, genes]}])["gene_ids"]
        for s in range(3)
    ]
    assert len({tuple(sorted(d[0, 1:].tolist())) for d in draws}) == 3
    # ... the embedding is of all 37 genes, through a fresh predictor too
    again = Predictor.from_pretrained(model_dir, progress=False).embed(make_adata(counts), seed=4)
    np.testing.assert_array_equal(again.obsm["X_ddsc_labels"][0], embedded)


def two_populations(n_cells: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every cell expresses every gene at the same rates, except a 10-gene program at 4x in population B."""
    rng = np.random.default_rng(seed)
    rates = np.random.default_rng(0).uniform(2.0, 8.0, N_GENES)
    labels = np.array(["A", "B"])[rng.integers(0, 2, n_cells)]
    program = (labels == "B")[:, None] & (np.arange(N_GENES) < 10)[None, :]
    counts = rng.poisson(rates * np.where(program, 4.0, 1.0)) + 1  # + 1: the same genes detected in every cell
    return counts.astype(np.float32), labels


def test_trained_embedding_separates_a_gene_program_and_shuffled_labels_are_chance(tmp_path):
    """A small model trained (plain NELBO) on two populations that differ only in one gene program's expression
    (the same genes detected, so the gene set alone tells nothing), with the population as a condition: the
    embedding of held-out cells, given no labels, separates them."""
    model = make_model(random_weights=False, dropout=0.5)
    dit = model.dit.train()
    collator = CellCollator(16, BinningConfig(num_bins=K), LABELS, ["population", "batch"], seed=0)
    diffusion = MaskedDiffusion(DiffusionConfig(), K)
    optimizer = torch.optim.AdamW(dit.parameters(), lr=3e-3)
    counts, labels = two_populations(2048, seed=1)
    genes = np.arange(3, VOCAB)
    generator = torch.Generator().manual_seed(0)
    for step in range(0, len(counts), 32):  # one epoch, 64 steps
        cells = zip(counts[step : step + 32], labels[step : step + 32], strict=True)
        samples = [{"genes": genes, "counts": c, "population": p} for c, p in cells]
        loss = diffusion.loss(dit, collator(samples), generator=generator).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_out, truth = two_populations(200, seed=2)
    embedded = Predictor.from_pretrained(save(model.eval(), tmp_path / "m"), progress=False).embed(make_adata(held_out))
    scores = label_scores(embedded.obsm["X_ddsc_labels"], truth, k=10)
    assert scores["knn_accuracy"] > 0.95 and scores["ari"] > 0.8
    shuffled = label_scores(embedded.obsm["X_ddsc_labels"], np.random.default_rng(3).permutation(truth), k=10)
    assert abs(shuffled["knn_accuracy"] - 0.5) < 0.1 and abs(shuffled["ari"]) < 0.05
