"""Metric logging for the DeepSpeed engine: console, a JSON-lines file, and W&B, under Composer's metric names.

The Composer engine gets this from its Trainer (console logger, ``FileLogger``, ``WandBLogger``, ``SpeedMonitor``);
this is the same output for a loop Composer does not own, so dashboards and the benchmark read one set of
names: ``train/*``, ``eval/*``, ``lr-<Optimizer>/group0``, ``throughput/{samples_per_sec, device/mfu, ...}``.
Throughput is averaged over the last ``speed_window_size`` batches, wall clock between batch ends, as
Composer's ``SpeedMonitor`` does; FLOPs are summed over ranks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ddsc.config import to_dict
from ddsc.train.builders import batches
from ddsc.train.config import RunConfig
from ddsc.train.throughput import RateWindow, token_counts


class MetricLog:
    """Rank 0 writes; every rank calls ``batch`` (the FLOP count is an all-reduce)."""

    def __init__(self, config: RunConfig, rank: int, device: torch.device, peak_flops: float | None):
        trainer = config.trainer
        self.rank = rank
        self.device = device  # of the FLOP all-reduce: NCCL reduces CUDA tensors only
        self.max_batches = batches(trainer.max_duration, "trainer.max_duration")
        self.console_every = batches(trainer.console_log_interval, "trainer.console_log_interval")
        self.to_console = trainer.log_to_console and rank == 0
        self.peak_flops = peak_flops
        self.window = RateWindow(trainer.speed_window_size)
        self.file = None
        self.wandb = None
        if rank == 0 and trainer.log_file:
            Path(trainer.log_file).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(trainer.log_file, "a")  # noqa: SIM115  (kept open for the whole run)
        if rank == 0 and trainer.wandb_project:
            import wandb

            self.wandb = wandb.init(
                project=trainer.wandb_project,
                entity=trainer.wandb_entity,
                name=trainer.run_name,
                config=to_dict(config),
                dir=os.environ.get("WANDB_DIR"),
            )

    def console(self, line: str) -> None:
        if self.to_console:
            print(line, flush=True)

    def announce(self, line: str) -> None:
        """Run events (such as a resume) are printed on rank 0 even with ``log_to_console: false``."""
        if self.rank == 0:
            print(line, flush=True)

    def metrics(self, batch: int, values: dict[str, float]) -> None:
        if self.rank != 0:
            return
        if self.file is not None:
            self.file.write(json.dumps({"batch": batch, **values}) + "\n")
            self.file.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=batch)
        if any(k.startswith("eval/") for k in values) or batch % self.console_every == 0:
            shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
            self.console(f"[batch={batch}/{self.max_batches}] {shown}")

    def batch(
        self, batch: int, values: dict[str, float], attention_mask: torch.Tensor, device_flops: float | None
    ) -> None:
        """Log one training batch's metrics with the throughput and MFU of the window ending here (no FLOPs and
        MFU for a model without a FLOPs count, ``device_flops`` None, as Composer's speed monitor does)."""
        flops = torch.tensor(device_flops or 0.0, dtype=torch.float64, device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flops)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rates = self.window.add(
            batches=1.0,
            samples=float(attention_mask.shape[0] * world),
            flops=float(flops),
            **token_counts(attention_mask),
        )
        values = dict(values)
        if rates:
            values.update(
                {
                    "throughput/batches_per_sec": rates["batches"],
                    "throughput/samples_per_sec": rates["samples"],
                    "throughput/device/samples_per_sec": rates["samples"] / world,
                    "throughput/device/real_tokens_per_sec": rates["real_tokens"],
                    "throughput/device/padded_tokens_per_sec": rates["padded_tokens"],
                }
            )
            if device_flops is not None:
                values["throughput/device/flops_per_sec"] = rates["flops"] / world
            if self.peak_flops and device_flops is not None:
                values["throughput/device/mfu"] = rates["flops"] / world / self.peak_flops
        if self.device.type == "cuda":  # as Composer's MemoryMonitor: gigabytes
            values["memory/peak_allocated_mem"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        self.metrics(batch, values)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
