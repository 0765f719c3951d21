"""``ddsc export`` of a ``latent_dit`` run: its checkpoint -> one ``DDSCLatentModel`` folder (``ddsc.latent.hf``).

A latent DiT checkpoint is self-contained (``ddsc.train.latent_models``): the DiT (``model.*``), the frozen VAE
it was trained on (``vae.*``), the latent scale (``latent_std``) and the histogram of training library sizes
(``library_counts``). The weights go into the HF model's ``dit`` and ``vae``; the two buffers, plain numbers
a user may want to read, into ``config.json``. The run config is resolved by ``ddsc.train.export`` first
(labels, condition sizes, vocabulary); the config's ``latent_vae`` is already the VAE run's own.
"""

from __future__ import annotations

import torch

from ddsc.config import to_dict
from ddsc.data.labels import LabelVocab
from ddsc.data.vocab import GeneVocab
from ddsc.latent.export import write_latent_folder
from ddsc.latent.hf import DDSCLatentConfig, DDSCLatentModel
from ddsc.train.checkpoints import load_exactly, read_model_state
from ddsc.train.config import RunConfig
from ddsc.train.latent_models import LOG_LIBRARY_RANGE


def latent_hf_config(run: RunConfig, latent_std: float, library_counts: torch.Tensor) -> DDSCLatentConfig:
    """The HF config of a resolved ``latent_dit`` run, its latent scale and training library histogram."""
    if latent_std <= 0:
        raise ValueError("the checkpoint's latent_std is 0: the latent DiT never trained a batch")
    low, high = LOG_LIBRARY_RANGE
    counts = library_counts.double()
    return DDSCLatentConfig(
        vae=to_dict(run.latent_vae),
        dit=to_dict(run.latent_dit),
        conditions=[to_dict(c) for c in run.model.conditions],
        gene_vocab_size=run.model.gene_vocab_size,
        max_genes=run.data.max_length,
        latent_std=latent_std,
        library={"low": low, "high": high, "counts": counts.tolist(), "cells": int(counts.sum())},
        binning=to_dict(run.data.binning),
    )


def latent_model_from_state(run: RunConfig, state: dict[str, torch.Tensor], context: str) -> DDSCLatentModel:
    """The HF model of a ``LatentDiTComposerModel`` state dict (what a checkpoint or ``state_dict()`` holds)."""
    for key in ("latent_std", "library_counts"):
        if key not in state:
            raise ValueError(f"{context}: no {key!r} in the checkpoint (not a latent_dit checkpoint of this version)")
    model = DDSCLatentModel(latent_hf_config(run, float(state["latent_std"]), state["library_counts"]))
    parts = {"dit": "model.", "vae": "vae."}
    for attribute, prefix in parts.items():
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        load_exactly(getattr(model, attribute), part, f"{context}: {attribute} weights do not match the run config")
    return model.eval()


def export_latent(checkpoint, out, run: RunConfig, vocab: GeneVocab, labels: LabelVocab | None, config_path) -> int:
    """Write the latent model of a ``latent_dit`` checkpoint as an HF folder; its parameter count."""
    state = read_model_state(checkpoint, verify=False)
    model = latent_model_from_state(run, state, f"{checkpoint} (run config {config_path})")
    write_latent_folder(model, out, vocab, labels, run)
    return sum(p.numel() for p in model.parameters())
