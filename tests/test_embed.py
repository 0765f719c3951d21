"""Cell embeddings: the cell decoder's loss, deterministic whole-cell chunks, and what ``ddsc embed`` returns."""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from ddsc.config import load_config, to_dict
from ddsc.data.binning_config import BinningConfig
from ddsc.data.collator import CellCollator
from ddsc.data.labels import LabelVocab
from ddsc.data.tokens import GENE_CLS, ExpressionTokens
from ddsc.data.vocab import GeneVocab
from ddsc.diffusion.config import DiffusionConfig
from ddsc.diffusion.masked_diffusion import MaskedDiffusion
from ddsc.eval.embedding import label_scores
from ddsc.inference import Predictor, gene_chunks
from ddsc.model.config import ModelConfig
from ddsc.model.export import write_hf_folder
from ddsc.model.hf import DDSCConfig, DDSCModel
from ddsc.train.composer_model import DDSCComposerModel
from ddsc.train.config import RunConfig
from ddsc.train.run_folder import check_compatible

K = 8
TOKENS = ExpressionTokens(K)
N_GENES = 40  # vocabulary genes 3..42
VOCAB = N_GENES + 3
ROOT = Path(__file__).resolve().parents[1]


def make_model(max_genes: int = 16, seed: int = 0, random_weights: bool = True) -> DDSCModel:
    torch.manual_seed(seed)
    config = DDSCConfig(
        d_model=32,
        n_layers=2,
        n_heads=4,
        num_bins=K,
        gene_vocab_size=VOCAB,
        max_genes=max_genes,
        cell_decoder=True,
        binning={"num_bins": K},
        diffusion={"cell_loss_weight": 1.0},
    )
    model = DDSCModel(config)
    if random_weights:  # DiT's zero init (and, without conditions, a zero adaLN input) makes every block the
        for module in model.modules():  # identity: make them all do something
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=0.3)
                torch.nn.init.normal_(module.bias, std=0.3)
    return model.eval()


def save(model: DDSCModel, folder) -> str:
    vocab = GeneVocab.from_features([f"ENSG{i:011d}" for i in range(N_GENES)], [f"G{i}" for i in range(N_GENES)])
    write_hf_folder(model, folder, vocab, LabelVocab({}))
    return str(folder)


def make_adata(counts: np.ndarray, labels=None) -> anndata.AnnData:
    var = pd.DataFrame(
        {"gene_symbols": [f"G{i}" for i in range(N_GENES)]}, index=[f"ENSG{i:011d}" for i in range(N_GENES)]
    )
    obs = pd.DataFrame(index=[f"c{i}" for i in range(len(counts))])
    if labels is not None:
        obs["population"] = labels
    return anndata.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)


def random_counts(n_cells: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.uniform(0.3, 6.0, size=(n_cells, N_GENES))).astype(np.float32)
    return x + (x > 0) * rng.integers(0, 3, size=x.shape)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save(make_model(), tmp_path_factory.mktemp("embed") / "hf")


# ------------------------------------------------------------------------------------------ gene chunks


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


# ------------------------------------------------------------------------------------- the cell decoder


def noisy_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gene_ids = torch.randint(3, VOCAB, (4, 12), generator=g)
    expr = torch.randint(0, K, (4, 12), generator=g)
    gene_ids[:, 0], expr[:, 0] = GENE_CLS, TOKENS.cls
    real = torch.ones(4, 12, dtype=torch.bool)
    real[:, 0] = False
    real[1, 8:] = False  # a shorter cell: padding
    attention_mask = real.clone()
    attention_mask[:, 0] = True
    return {"gene_ids": gene_ids, "expr": expr, "real": real, "attention_mask": attention_mask}


def test_cell_loss_is_the_decoders_ce_on_masked_genes_and_does_not_see_them():
    dit = make_model().dit
    batch = noisy_batch()
    diffusion = MaskedDiffusion(DiffusionConfig(cell_loss_weight=0.5), K)
    t = torch.full((4,), 0.5)
    out = diffusion.loss(dit, batch, t=t, generator=torch.Generator().manual_seed(3))
    plain = MaskedDiffusion(DiffusionConfig(), K).loss(dit, batch, t=t, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.masked, plain.masked) and out.nelbo_sum == plain.nelbo_sum  # NELBO: the denoiser's
    noisy = batch["expr"].masked_fill(out.masked, TOKENS.mask)
    cell, _ = dit.embeddings(batch["gene_ids"], noisy, batch["attention_mask"])
    rows, positions = out.masked.nonzero(as_tuple=True)
    logits = dit.cell_decoder(cell[rows], dit.gene_embedding(batch["gene_ids"][rows, positions]))
    ce = torch.nn.functional.cross_entropy(logits, batch["expr"][rows, positions], reduction="sum")
    assert out.cell_ce_sum.item() == pytest.approx(ce.item(), rel=1e-5)
    expected = plain.loss + 0.5 * ce / out.num_masked
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the decoded bins are not visible to the cell embedding: other clean bins at masked positions, same logits
    other = dict(batch, expr=torch.where(out.masked, (batch["expr"] + 3) % K, batch["expr"]))
    _, same = dit(other["gene_ids"], other["expr"].masked_fill(out.masked, TOKENS.mask), batch["attention_mask"],
                  decode_cell=out.masked)  # fmt: skip
    torch.testing.assert_close(same, logits)


def test_cell_loss_needs_the_decoder():
    model_cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, gene_vocab_size=VOCAB, num_bins=K)
    with pytest.raises(ValueError, match="needs model.cell_decoder: true"):
        DDSCComposerModel(model_cfg, DiffusionConfig(cell_loss_weight=0.1))
    with pytest.raises(ValueError, match="cell_loss_weight: must be >= 0"):
        DiffusionConfig(cell_loss_weight=-1.0)


# ------------------------------------------------------------------------------------------- ddsc embed


def test_embed_is_deterministic_gene_order_invariant_and_independent_of_the_batch(model_dir):
    counts = random_counts(9)
    assert (np.count_nonzero(counts, axis=1) > 16).all()  # every cell is cut into chunks (max_genes 16)
    predictor = Predictor.from_pretrained(model_dir, progress=False, batch_size=4)
    out = predictor.embed(make_adata(counts))
    first = out.obsm["X_ddsc_cls"]
    assert first.shape == (9, 32) and out.uns["ddsc_embed"]["cell_decoder"] is True
    torch.manual_seed(123)  # no hidden use of the global RNG
    np.testing.assert_array_equal(predictor.embed(make_adata(counts)).obsm["X_ddsc_cls"], first)
    order = np.random.default_rng(1).permutation(N_GENES)
    permuted = make_adata(counts)[:, order].copy()
    np.testing.assert_allclose(predictor.embed(permuted).obsm["X_ddsc_cls"], first, rtol=1e-5, atol=1e-6)
    alone = Predictor.from_pretrained(model_dir, progress=False, batch_size=1).embed(make_adata(counts[5:6]))
    np.testing.assert_allclose(alone.obsm["X_ddsc_cls"][0], first[5], rtol=1e-5, atol=1e-6)
    assert not np.allclose(predictor.embed(make_adata(counts), seed=1).obsm["X_ddsc_cls"], first)  # other cuts


def test_long_cell_embedding_is_the_mean_over_chunks_of_all_its_genes(model_dir):
    counts = random_counts(1, seed=2)
    predictor = Predictor.from_pretrained(model_dir, progress=False)
    embedded = predictor.embed(make_adata(counts), seed=4).obsm["X_ddsc_cls"][0]
    genes = np.flatnonzero(counts[0])
    tokens = genes + 3
    values = torch.from_numpy(counts[0, genes])[None]
    bins = predictor.collator.bins_for(values, torch.ones_like(values, dtype=torch.bool))[0]  # the whole cell's
    chunks = gene_chunks(tokens, 16, seed=4)
    assert len(chunks) == int(np.ceil(len(genes) / 16)) >= 2
    rows = []
    for part in chunks:
        gene_ids = torch.tensor([GENE_CLS, *tokens[part]])[None]
        expr = torch.cat([torch.tensor([TOKENS.cls]), bins[part]])[None]
        with torch.no_grad():
            rows.append(predictor.model.dit.embeddings(gene_ids, expr, torch.ones_like(gene_ids, dtype=torch.bool))[0])
    np.testing.assert_allclose(embedded, torch.cat(rows).mean(0).numpy(), rtol=1e-5, atol=1e-6)


def test_a_model_exported_before_the_cell_decoder_still_loads_and_embeds(tmp_path):
    model = make_model()
    model.config.cell_decoder = False
    model.dit.cell_decoder = None
    folder = save(model, tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    for key, section in (("cell_decoder", config), ("cell_loss_weight", config["diffusion"])):
        section.pop(key)
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    out = Predictor.from_pretrained(folder, progress=False).embed(make_adata(random_counts(3)))
    assert out.uns["ddsc_embed"]["cell_decoder"] is False and np.isfinite(out.obsm["X_ddsc_cls"]).all()


def two_populations(n_cells: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every cell expresses every gene at the same rates, except a 10-gene program at 4x in population B."""
    rng = np.random.default_rng(seed)
    rates = np.random.default_rng(0).uniform(2.0, 8.0, N_GENES)
    labels = np.array(["A", "B"])[rng.integers(0, 2, n_cells)]
    program = (labels == "B")[:, None] & (np.arange(N_GENES) < 10)[None, :]
    counts = rng.poisson(rates * np.where(program, 4.0, 1.0)) + 1  # + 1: the same genes detected in every cell
    return counts.astype(np.float32), labels


def test_trained_cell_embedding_separates_a_gene_program_and_shuffled_labels_are_chance(tmp_path):
    """A small model trained with the cell decoder on two populations that differ only in one gene program's
    expression (same genes detected, so the gene set alone tells nothing): its embedding separates them."""
    model = make_model(random_weights=False)
    dit = model.dit.train()
    collator = CellCollator(16, BinningConfig(num_bins=K), seed=0)
    diffusion = MaskedDiffusion(DiffusionConfig(cell_loss_weight=1.0), K)
    optimizer = torch.optim.AdamW(dit.parameters(), lr=3e-3)
    counts, _ = two_populations(2048, seed=1)
    genes = np.arange(3, VOCAB)
    generator = torch.Generator().manual_seed(0)
    for step in [s for _ in range(3) for s in range(0, len(counts), 32)]:  # 3 epochs, 192 steps
        batch = collator([{"genes": genes, "counts": c} for c in counts[step : step + 32]])
        loss = diffusion.loss(dit, batch, generator=generator).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_out, labels = two_populations(200, seed=2)
    embedded = Predictor.from_pretrained(save(model.eval(), tmp_path / "m"), progress=False).embed(make_adata(held_out))
    scores = label_scores(embedded.obsm["X_ddsc_cls"], labels, k=10)
    assert scores["knn_accuracy"] > 0.95 and scores["ari"] > 0.8
    shuffled = label_scores(embedded.obsm["X_ddsc_cls"], np.random.default_rng(3).permutation(labels), k=10)
    assert abs(shuffled["knn_accuracy"] - 0.5) < 0.1 and abs(shuffled["ari"]) < 0.05


def test_a_run_saved_before_the_cell_loss_existed_still_resumes():
    config = load_config(RunConfig, ROOT / "yamls" / "demo_cpu.yaml")
    saved = to_dict(config)
    del saved["model"]["cell_decoder"], saved["diffusion"]["cell_loss_weight"]  # a config.yaml from before
    check_compatible(saved, config)  # absent keys compare as their defaults
    turned_on = load_config(RunConfig, ROOT / "yamls" / "demo_cpu.yaml", ["model.cell_decoder=true"])
    with pytest.raises(ValueError, match="cannot resume: 'model.cell_decoder' was False in the saved run but is True"):
        check_compatible(saved, turned_on)
