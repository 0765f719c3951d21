"""Composer callback: write a Hugging Face export folder every ``interval`` (and at the end of training).

Exports land in ``folder/ba{batch}/`` (the same layout as ``ddsc export``), so a run can be sampled from or
evaluated while it trains without converting checkpoints. Under FSDP the full weights are gathered with
``get_model_state_dict(full_state_dict=True, cpu_offload=True)``, a collective every rank joins; only rank 0
writes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ddsc.latent.export import write_latent_folder
from ddsc.model.export import hf_config_from_run, write_hf_folder
from ddsc.model.hf import DDSCModel
from ddsc.train.checkpoints import strip_wrappers
from ddsc.train.latent_export import latent_model_from_state
from ddsc.train.run import ResolvedRun


class HFExport(Callback):
    """``interval`` like ``"500ba"`` (batches only); ``run``: the resolved run (its config and vocabularies)."""

    def __init__(self, interval: str, folder: str | Path, run: ResolvedRun):
        time = Time.from_timestring(interval)
        if time.unit != TimeUnit.BATCH or time.value < 1:
            raise ValueError(
                f"trainer.hf_export_interval: expected a positive number of batches (e.g. '500ba'), got {interval!r}"
            )
        self.every = int(time.value)
        self.folder = Path(folder)
        self.run = run
        self.exported: list[Path] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) % self.every == 0:
            self._export(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) % self.every:
            self._export(state)

    def _export(self, state: State) -> None:
        """Every rank joins the gather (FSDP); rank 0 writes the folder. The masked family exports its DiT; a
        latent DiT run its whole wrapper (DiT, frozen VAE, latent scale, library histogram), as ``ddsc export``
        reads it from a checkpoint."""
        model = state.model.module if hasattr(state.model, "module") else state.model
        latent = self.run.config.family == "latent_dit"
        part = model if latent else model.model
        if dist.is_initialized():
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(part, options=options)
        else:
            weights = {k: v.detach().cpu() for k, v in part.state_dict().items()}
        if dist.get_global_rank() != 0:
            return
        out = self.folder / f"ba{int(state.timestamp.batch)}"
        weights = strip_wrappers(weights)
        with torch.no_grad():
            if latent:
                hf_latent = latent_model_from_state(self.run.config, weights, f"hf export at {out.name}")
                write_latent_folder(hf_latent, out, self.run.vocab, self.run.labels, self.run.config)
            else:
                hf_model = DDSCModel(hf_config_from_run(self.run.config))
                hf_model.dit.load_state_dict({k: v.float() for k, v in weights.items()})
                write_hf_folder(hf_model, out, self.run.vocab, self.run.labels, self.run.config)
        self.exported.append(out)
