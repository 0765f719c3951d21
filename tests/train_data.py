"""Synthetic MDS datasets for the training tests, written directly with streaming.MDSWriter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from streaming import MDSWriter

from ddsc.data.schema import LABELS_FILE, MDS_COLUMNS, METADATA_COLUMNS
from ddsc.data.vocab import GeneVocab

LINES = ["CVCL_A", "CVCL_B", "CVCL_C"]
DRUGS = ["DMSO_TF", "drugX"]


def write_mds(
    root: Path,
    n_train: int = 64,
    n_valid: int = 16,
    genes: int = 200,
    max_genes: int = 40,
    seed: int = 0,
    name: str = "synth",
):
    """``root/{train,valid}`` with cells whose counts follow their cell line (so there is something to learn),
    xxh64 shard hashes, and ``labels.json`` / ``vocab.json`` beside the splits, as data_prep writes them."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("valid", n_valid)):
        options = {"columns": MDS_COLUMNS, "compression": "zstd", "size_limit": 1 << 14, "hashes": ["xxh64"]}
        with MDSWriter(out=str(root / split), **options) as out:
            for i in range(n):
                line = i % len(LINES)
                k = int(rng.integers(5, max_genes + 1))
                gene_ids = np.sort(rng.choice(np.arange(3, genes), size=k, replace=False)).astype(np.int32)
                counts = (1 + rng.poisson(1 + (gene_ids % (line + 2)) * 3)).astype(np.int32)
                sample = {name: "" for name in METADATA_COLUMNS}
                sample.update(
                    cell_id=f"{name}-{split}-{i}",
                    genes=gene_ids,
                    counts=counts,
                    cell_line_id=LINES[line],
                    drug=DRUGS[i % 2],
                )
                out.write(sample)
    (root / LABELS_FILE).write_text(json.dumps({"cell_line_id": LINES, "drug": DRUGS}))
    ids = range(3, genes)
    GeneVocab(list(ids), [f"ENSG{i:011d}" for i in ids], [f"G{i}" for i in ids]).to_json(root / "vocab.json")
    return root


SMALL_VAE = ["latent_vae.d_model=32", "latent_vae.n_latents=4", "latent_vae.d_latent=4"]


def latent_overrides(mds: Path) -> list[str]:
    """Overrides of ``yamls/latent_*_demo_cpu.yaml`` for tiny runs on a ``write_mds`` dataset: batches of 8 cells
    of at most 16 genes, both label conditions."""
    return [
        f"data.streams.demo.remote={mds}",
        "data.max_length=16",
        "data.num_workers=0",
        "model.gene_vocab_size=200",
        "model.conditions=[{name: cell_line_id}, {name: drug}]",
        "trainer.global_train_batch_size=8",
        "trainer.device_train_microbatch_size=4",
        "trainer.device_eval_batch_size=8",
        "trainer.progress_bar=false",
    ]


def small_latent_dit(vae_run: Path) -> list[str]:
    """A one-layer latent DiT on the VAE run in ``vae_run``."""
    return [f"latent_dit.vae={vae_run}", "latent_dit.d_model=32", "latent_dit.n_layers=1"]
