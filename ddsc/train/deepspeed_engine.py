"""The DeepSpeed engine (``parallelism.engine: deepspeed``): ZeRO stage 0-3, optional CPU offload.

It drives the same objects as the Composer engine (the family's ``ComposerModel``, with its loss and metrics,
the streaming loaders and collator, the optimizer builder, the resolved ``config.yaml``) with its own loop:

    for each global batch:   seed torch from (seed, rank, batch)           (as the SeedEachBatch callback)
        for each microbatch: loss = engine(microbatch).loss; engine.backward(loss)
        engine.step()        # ZeRO reduce-scatter, gradient clipping, optimizer step, LR schedule step
        log metrics; evaluate / checkpoint at their intervals

The learning rate follows ``builders.lr_multiplier`` (the Composer scheduler's curve, batch for batch).
Checkpoints are DeepSpeed's own (``save_folder/ba{N}/`` tag folders + ``latest``); the ``StreamingDataLoader``
state and the batch counter travel in ``client_state`` so an autoresumed run continues the same sample order,
noise and LR. ``ddsc export`` reads these folders (``zero_to_fp32``) with the ``config.yaml`` beside them.

Precision (``deepspeed_precision``) is one policy on every device, so the CPU suite runs the GPU's path: with
bf16 (``amp_bf16``, or ``auto`` where bf16 is fast) and ZeRO stage 2 or 3, DeepSpeed's ``bf16`` section holds
the module in bf16 while ZeRO keeps float32 master weights, accumulates gradients and reduces them in float32
(the DiT keeps its float32 islands itself, see ``ddsc.model.dit``). At stages 0 and 1 the engine keeps float32
weights and the model wrapper autocasts instead, as Composer's DDP does: DeepSpeed routes bf16 there through
its fp16 wrapper (stage 0) or, with float32 gradient accumulation, its ``BF16_Optimizer`` (stage 1), whose
checkpoints its own ``zero_to_fp32`` cannot read ("is not a zero checkpoint"), so they could not be exported. On GPU the CUDA device is set from ``LOCAL_RANK``
before any collective, TF32 is enabled as Composer's GPU device does, and metric state lives on the device.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddsc.config import ConfigError
from ddsc.precision import concrete_precision, enable_tf32
from ddsc.train.builders import batches, lr_multiplier
from ddsc.train.callbacks import batch_seed
from ddsc.train.checkpoint_integrity import deepspeed_folder, recover_on_rank_zero
from ddsc.train.config import RunConfig
from ddsc.train.metric_log import MetricLog
from ddsc.train.run import TrainSummary, build_loaders, prepare_run
from ddsc.train.run_folder import write_config

TAG_PREFIX = "ba"


@dataclass(frozen=True)
class DeepSpeedPrecision:
    """How the engine runs bf16: DeepSpeed's bf16 section (bf16 module, fp32 master weights) or autocast."""

    bf16_section: bool = False
    autocast_dtype: torch.dtype | None = None


def deepspeed_precision(config: RunConfig, device: str) -> DeepSpeedPrecision:
    """``trainer.precision`` for this engine on ``device`` ("cpu" or "gpu"); see the module docstring."""
    if config.trainer.precision == "amp_fp16":
        raise ConfigError("trainer.precision: the deepspeed engine supports amp_bf16, auto or fp32 (not amp_fp16)")
    bf16 = concrete_precision(config.trainer.precision, device) == "amp_bf16"
    if not bf16:
        return DeepSpeedPrecision()
    if config.parallelism.zero_stage <= 1:
        return DeepSpeedPrecision(autocast_dtype=torch.bfloat16)
    return DeepSpeedPrecision(bf16_section=True)


def deepspeed_config(config: RunConfig, world_size: int, precision: DeepSpeedPrecision) -> dict[str, Any]:
    """The DeepSpeed JSON config: batch sizes, precision, ZeRO stage and offload, gradient clipping."""
    trainer, par = config.trainer, config.parallelism
    device_batch = trainer.global_train_batch_size // world_size
    micro = trainer.device_train_microbatch_size
    if device_batch % micro:  # type: ignore[operator]  ("auto" is rejected by RunConfig for this engine)
        raise ConfigError(
            f"trainer.device_train_microbatch_size={micro} must divide the per-rank batch {device_batch} "
            "(deepspeed engine)"
        )
    zero: dict[str, Any] = {"stage": par.zero_stage}
    if par.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if par.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    dtypes: dict[str, Any] = {}
    if precision.bf16_section:
        dtypes = {
            "bf16": {"enabled": True},
            "data_types": {"grad_accum_dtype": "fp32"},  # microbatch gradients summed in float32
            "communication_data_type": "fp32",  # reduce in float32, as FSDP's mixed precision does
        }
    return {
        **dtypes,
        "train_batch_size": trainer.global_train_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": device_batch // micro,
        "gradient_clipping": trainer.grad_clip_norm,
        "zero_optimization": zero,
        # Our own optimizer (DecoupledAdamW / AdamW) also with offload: DeepSpeed's CPU Adam would need a C++ build.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # our MetricLog prints; DeepSpeed's own step log stays quiet
    }


def check_deepspeed(config: RunConfig) -> None:
    """Engine-specific config checks, run by ``check_data`` before any process starts."""
    from ddsc.data.streaming import is_remote

    trainer, par = config.trainer, config.parallelism
    for key in ("max_duration", "eval_interval", "save_interval", "console_log_interval"):
        batches(getattr(trainer, key), f"trainer.{key}")
    if trainer.save_folder and is_remote(trainer.save_folder):
        raise ConfigError(
            f"trainer.save_folder: the deepspeed engine writes to a filesystem path (shared or mounted), "
            f"not {trainer.save_folder}"
        )
    if trainer.hf_export_interval:
        raise ConfigError(
            "trainer.hf_export_interval: not supported by the deepspeed engine; run `ddsc export --checkpoint "
            "SAVE_FOLDER` on its checkpoints"
        )
    if par.offload_params and par.zero_stage != 3:
        raise ConfigError("parallelism.offload_params: needs zero_stage 3 (stages 1-2 do not partition parameters)")
    if par.offload_optimizer and par.zero_stage == 0:
        raise ConfigError("parallelism.offload_optimizer: needs zero_stage >= 1")


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint's client_state."""

    batch: int = 0
    samples: int = 0


def _tags(folder: Path) -> list[Path]:
    found = [p for p in folder.glob(f"{TAG_PREFIX}*") if p.is_dir() and p.name[len(TAG_PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(TAG_PREFIX) :]))


def _peak_flops(config: RunConfig, precision: DeepSpeedPrecision) -> float | None:
    """``trainer.peak_flops_per_device``, else the GPU's datasheet peak for the precision (Composer's table)."""
    if config.trainer.peak_flops_per_device or not torch.cuda.is_available():
        return config.trainer.peak_flops_per_device
    from types import SimpleNamespace

    from composer.callbacks.speed_monitor import get_gpu_flops_available
    from composer.core import Precision

    bf16 = precision.bf16_section or precision.autocast_dtype is not None
    return get_gpu_flops_available(SimpleNamespace(precision=Precision.AMP_BF16 if bf16 else Precision.FP32)) or None


class DeepSpeedRun:
    """One training run: the engine, its loaders and logger; ``fit()`` trains to ``trainer.max_duration``."""

    def __init__(self, config: RunConfig):
        import deepspeed
        from composer.utils import reproducibility

        from ddsc.train.builders import build_composer_model, build_optimizer, resolve_device
        from ddsc.train.run_folder import resolve_save_folder

        trainer = config.trainer
        self.device = resolve_device(trainer)
        if self.device == "gpu":
            # Before any collective: NCCL (and all_gather_object) use the current device, cuda:0 by default.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            enable_tf32()
        deepspeed.init_distributed(dist_backend="nccl" if self.device == "gpu" else "gloo")
        run = prepare_run(config, self.device)
        self.config = config = run.config
        self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.max_batches = batches(trainer.max_duration, "trainer.max_duration")
        self.eval_every = batches(trainer.eval_interval, "trainer.eval_interval")
        self.save_every = batches(trainer.save_interval, "trainer.save_interval")
        save_folder = resolve_save_folder(config)
        self.save_folder = Path(save_folder) if save_folder else None
        precision = deepspeed_precision(config, self.device)  # after init: every rank makes the same choice
        ds_config = deepspeed_config(config, self.world_size, precision)

        self.train_loader, self.eval_loader = build_loaders(run, self.world_size)
        reproducibility.seed_all(trainer.seed)  # same initial weights as the Composer engine, on every rank
        model = build_composer_model(config, precision.autocast_dtype)
        if config.parallelism.compile:
            model.model.compile_blocks()
        optimizer = build_optimizer(config.optimizer, model, self.device)

        def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            # A callable, so the schedule wraps the optimizer DeepSpeed ends up stepping (ZeRO re-groups params).
            curve = lambda step: lr_multiplier(config.scheduler, step, self.max_batches)  # noqa: E731
            return torch.optim.lr_scheduler.LambdaLR(opt, curve)

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
        )
        self.model = self.engine.module
        for metric in [*self.model.train_metrics.values(), *self.model.val_metrics.values()]:
            metric.to(self.engine.device)  # their all-reduce runs on the process group's device (NCCL: CUDA)
        self.micro = ds_config["train_micro_batch_size_per_gpu"]
        self.optimizer_name = type(optimizer).__name__
        self.progress = Progress()
        self.log = MetricLog(config, self.rank, self.engine.device, _peak_flops(config, precision))

    # -- checkpoints -------------------------------------------------------------------------------------------
    def resume(self) -> bool:
        """Load the newest intact checkpoint of ``save_folder`` (autoresume); False when there is none yet."""
        if self.save_folder is None:
            return False
        recover_on_rank_zero(deepspeed_folder(self.save_folder), self.rank, torch.distributed.barrier)
        if not (self.save_folder / "latest").is_file():
            return False
        path, client = self.engine.load_checkpoint(str(self.save_folder))
        if path is None:
            raise RuntimeError(f"{self.save_folder}: 'latest' names a checkpoint that cannot be loaded")
        self.progress = Progress(**client["progress"])
        self.train_loader.load_state_dict(client["train_loader"])
        # Streaming shares the loader's resume state between a node's ranks in shared memory that the rank which
        # created it unlinks at exit: no rank may leave (a finished run returns at once) before all attached.
        torch.distributed.barrier()
        self.log.announce(f"resumed from {path} at batch {self.progress.batch}")
        return True

    def save(self) -> None:
        if self.save_folder is None:
            return
        client = {"progress": vars(self.progress), "train_loader": self.train_loader.state_dict()}
        self.engine.save_checkpoint(
            str(self.save_folder), tag=f"{TAG_PREFIX}{self.progress.batch}", client_state=client
        )
        keep = self.config.trainer.save_num_checkpoints_to_keep
        if self.rank == 0 and keep > 0:
            for old in _tags(self.save_folder)[:-keep]:
                shutil.rmtree(old)
        torch.distributed.barrier()

    # -- the loop ----------------------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        device = self.engine.device
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def train_batch(self, batch: dict) -> dict[str, float]:
        """One optimizer step over the microbatches of this rank's batch; returns the batch's train metrics."""
        # noise is a function of the step (resumes draw what the first run drew), as in the Composer engine
        torch.manual_seed(batch_seed(self.config.trainer.seed, self.rank, self.progress.batch))
        self.engine.train()
        metrics = self.model.get_metrics(is_train=True)
        for metric in metrics.values():
            metric.reset()
        size = len(batch["gene_ids"])
        for start in range(0, size, self.micro):
            micro = {k: v[start : start + self.micro] for k, v in batch.items()}
            out = self.engine(micro)
            self.engine.backward(out.loss)
            self.engine.step()
            for metric in metrics.values():
                metric.update(out)
        self.progress.batch += 1
        self.progress.samples += size * self.world_size
        return {f"train/{k}": float(m.compute()) for k, m in metrics.items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Full pass over the eval split (or ``eval_subset_num_batches``), same noise at every evaluation."""
        self.engine.eval()
        self.model.reset_eval_noise()
        metrics = self.model.get_metrics(is_train=False)
        for metric in metrics.values():
            metric.reset()
        limit = self.config.trainer.eval_subset_num_batches
        for i, batch in enumerate(self.eval_loader):
            if 0 <= limit <= i:
                break
            out = self.model.eval_forward(self._to_device(batch))
            for metric in metrics.values():
                metric.update(out)
        return {f"eval/{k}": float(m.compute()) for k, m in metrics.items()}

    def fit(self) -> TrainSummary:
        if self.config.trainer.autoresume:
            self.resume()
        if self.progress.batch >= self.max_batches:  # resumed at the end: no batch, evaluation or checkpoint to add
            self.log.close()
            return TrainSummary(self.progress.batch, self.progress.samples, 0.0, {}, already_complete=True)
        if self.save_folder is not None and self.rank == 0:
            write_config(str(self.save_folder), self.config)
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        evaluated_at = saved_at = -1
        empty_epochs = 0  # a checkpoint taken at an epoch's last batch resumes into one empty remainder
        while self.progress.batch < self.max_batches:
            yielded = 0
            for batch in self.train_loader:
                if self.progress.batch >= self.max_batches:
                    break
                yielded += 1
                flops = self.model.flops_per_batch(batch) if hasattr(self.model, "flops_per_batch") else None
                step = self.train_batch(self._to_device(batch))
                metrics.update(step)
                step[f"lr-{self.optimizer_name}/group0"] = self.scheduler.get_last_lr()[0]
                self.log.batch(self.progress.batch, step, batch["attention_mask"], flops)
                if self.eval_loader is not None and self.progress.batch % self.eval_every == 0:
                    metrics.update(self._evaluate_and_log())
                    evaluated_at = self.progress.batch
                if self.progress.batch % self.save_every == 0:
                    self.save()
                    saved_at = self.progress.batch
            empty_epochs = 0 if yielded else empty_epochs + 1
            if empty_epochs > 1:
                raise RuntimeError(f"the training split '{self.config.data.train_split}' yields no full batch")
        if self.eval_loader is not None and evaluated_at != self.progress.batch:
            metrics.update(self._evaluate_and_log())
        if saved_at != self.progress.batch:
            self.save()
        self.log.close()
        return TrainSummary(
            batches=self.progress.batch,
            samples=self.progress.samples,
            wall_s=time.perf_counter() - start,
            metrics=metrics,
        )

    def _evaluate_and_log(self) -> dict[str, float]:
        result = self.evaluate()
        self.log.metrics(self.progress.batch, result)
        return result


def train_deepspeed(config: RunConfig) -> TrainSummary:
    """Train with DeepSpeed (called by ``ddsc.train.trainer.train``)."""
    return DeepSpeedRun(config).fit()
