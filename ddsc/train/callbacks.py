"""DDSC's own Composer callbacks (Composer's speed / LR / optimizer monitors are added by the builders)."""

from __future__ import annotations

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch.nn.parallel import DistributedDataParallel

from ddsc.train.config import RunConfig
from ddsc.train.run_folder import write_config


class SaveResolvedConfig(Callback):
    """Write the exact resolved config as ``save_folder/config.yaml`` when training starts (rank 0)."""

    def __init__(self, config: RunConfig, save_folder: str):
        self.config = config
        self.save_folder = save_folder

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            write_config(self.save_folder, self.config)


class ResetEvalNoise(Callback):
    """Re-seed the evaluation noise at every evaluation so successive evaluations are comparable."""

    def eval_start(self, state: State, logger: Logger) -> None:
        model = state.model.module if isinstance(state.model, DistributedDataParallel) else state.model
        model.reset_eval_noise()


def batch_seed(seed: int, rank: int, batch: int) -> int:
    """The torch seed of one rank's batch, for both engines (a tuple's hash: the same in every process)."""
    return hash((seed, rank, batch)) % 2**63


class SeedEachBatch(Callback):
    """Seed torch's RNG from (seed, rank, batch) before every batch: diffusion times, masks and condition dropout
    become a function of the step, so a resumed run draws exactly what the uninterrupted run drew.

    Composer 0.32 restores its saved RNG state only at an epoch boundary when the dataset resumes itself
    (StreamingDataset), so mid-epoch autoresume would otherwise continue with different noise.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def batch_start(self, state: State, logger: Logger) -> None:
        torch.manual_seed(batch_seed(self.seed, dist.get_global_rank(), int(state.timestamp.batch)))
