"""Builders: one function per training ingredient, from the typed ``RunConfig`` to Composer objects.

Both engines (Composer and DeepSpeed) call these, so the optimizer, the learning-rate curve, the loggers and
the precision policy are defined once. Like llm-foundry's builders, but typed: the config was validated
before we got here, so these functions only translate.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import torch
from composer.algorithms import EMA, GradientClipping
from composer.callbacks import LRMonitor, MemoryMonitor, OptimizerMonitor, RuntimeEstimator, SpeedMonitor
from composer.core import Algorithm, Callback, Time, Timestamp, TimeUnit
from composer.loggers import FileLogger, LoggerDestination, WandBLogger
from composer.optim import (
    ComposerScheduler,
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    DecoupledAdamW,
    LinearWithWarmupScheduler,
)
from composer.utils.parallelism import FSDP2Config, FSDPConfig

from ddsc.config import ConfigError, to_dict
from ddsc.precision import concrete_precision
from ddsc.train.config import OptimizerConfig, ParallelismConfig, RunConfig, SchedulerConfig, TrainerConfig
from ddsc.train.throughput import TokenRates


def resolve_device(trainer: TrainerConfig) -> str:
    """``cpu`` or ``gpu``; ``auto`` picks the GPU when one is visible."""
    if trainer.device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if trainer.device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("trainer.device: 'gpu' requested but no CUDA device is visible")
    return trainer.device


def resolve_precision(trainer: TrainerConfig, device: str) -> tuple[str, torch.dtype | None]:
    """(precision handed to Composer, dtype the model wrapper autocasts to itself).

    On GPU Composer runs ``amp_bf16`` itself: autocast, and under FSDP bf16 parameters in the forward (its
    ``mixed_precision: DEFAULT``). Composer refuses any precision but fp32 on CPU, so there the engine runs
    "fp32" and ``DDSCComposerModel.forward`` autocasts to bf16 (weights, optimizer state and the loss stay
    fp32): always for ``amp_bf16``, and for ``auto`` only where this CPU's bf16 matmuls are measured faster
    (``ddsc.precision``). Call it after the process group exists, so every rank makes the same choice.
    """
    want = concrete_precision(trainer.precision, device)
    if device == "gpu":
        return want, None
    if want == "amp_fp16":
        raise ConfigError("trainer.precision: amp_fp16 needs a GPU (use amp_bf16 or auto on CPU)")
    return "fp32", torch.bfloat16 if want == "amp_bf16" else None


def build_composer_model(config: RunConfig, autocast_dtype: torch.dtype | None):
    """The ``ComposerModel`` of the run's ``family``: the masked DiT, or a latent-family wrapper."""
    if config.family == "masked":
        from ddsc.train.composer_model import DDSCComposerModel

        return DDSCComposerModel(config.model, config.diffusion, autocast_dtype)
    from ddsc.train.latent_models import build_latent_model

    return build_latent_model(config, autocast_dtype)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the linear layers' weights only (nanoGPT's split): never on embeddings (whose row 0 of
    each condition table is the learned null label), biases or norms. Frozen parameters (the latent DiT's VAE)
    are left out of the optimizer."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            (decay if isinstance(module, torch.nn.Linear) and name == "weight" else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: OptimizerConfig, model: torch.nn.Module, device: str) -> torch.optim.Optimizer:
    """``decoupled_adamw`` (Composer's, weight decay not scaled by the LR, as in llm-foundry) or ``adamw``: torch's
    AdamW, fused on GPU (one kernel for all parameters and no host sync per parameter; foreach on CPU), with its
    decay divided by the peak LR so that ``lr_t * wd / lr`` is exactly the decoupled ``(lr_t / lr) * wd``."""
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.name == "decoupled_adamw":
        return DecoupledAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    for group in groups:
        group["weight_decay"] /= cfg.lr
    kernel = {"fused": True} if device == "gpu" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kernel)


def build_scheduler(cfg: SchedulerConfig) -> ComposerScheduler:
    if cfg.name == "cosine_with_warmup":
        return CosineAnnealingWithWarmupScheduler(t_warmup=cfg.t_warmup, alpha_f=cfg.alpha_f)
    if cfg.name == "linear_with_warmup":
        return LinearWithWarmupScheduler(t_warmup=cfg.t_warmup, alpha_f=cfg.alpha_f)
    return ConstantWithWarmupScheduler(t_warmup=cfg.t_warmup)


def batches(duration: str, key: str) -> int:
    """A duration such as ``"500ba"`` in batches (the DeepSpeed engine counts optimizer steps only)."""
    try:
        time = Time.from_timestring(duration)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None
    if time.unit != TimeUnit.BATCH:
        raise ConfigError(f"{key}: the deepspeed engine needs a duration in batches (e.g. '1000ba'), got {duration}")
    return int(time.value)


def lr_multiplier(cfg: SchedulerConfig, step: int, max_steps: int) -> float:
    """The LR multiplier that the Composer engine applies during batch ``step`` (0-based), for the DeepSpeed engine:
    Composer's own scheduler (``build_scheduler``) evaluated on the few fields of a ``State`` it reads.

    Composer 0.32 steps the scheduler at the end of a batch *before* advancing its batch counter, so batch
    ``k >= 1`` trains with the curve's value at ``k - 1`` (batch 0 and 1 both use the value at 0). Reproducing
    that lag keeps both engines on the same trajectory, batch for batch.
    """
    state = SimpleNamespace(
        max_duration=Time(max_steps, TimeUnit.BATCH), timestamp=Timestamp(batch=max(step - 1, 0)), dataloader_len=None
    )
    return float(build_scheduler(cfg)(state))


def build_algorithms(trainer: TrainerConfig) -> list[Algorithm]:
    algorithms: list[Algorithm] = []
    if trainer.grad_clip_norm > 0:
        algorithms.append(GradientClipping(clipping_type="norm", clipping_threshold=trainer.grad_clip_norm))
    if trainer.ema_decay is not None:
        algorithms.append(EMA(half_life=None, smoothing=trainer.ema_decay, update_interval="1ba"))
    return algorithms


def build_callbacks(trainer: TrainerConfig, device: str) -> list[Callback]:
    """Speed (throughput and MFU), LR, runtime estimate; GPU memory on GPU; optimizer norms when asked for
    (``trainer.optimizer_monitor_interval``: one value per parameter, for W&B / the log file, not the console)."""
    callbacks: list[Callback] = [
        SpeedMonitor(window_size=trainer.speed_window_size, gpu_flops_available=trainer.peak_flops_per_device),
        LRMonitor(),
        RuntimeEstimator(),
        TokenRates(trainer.speed_window_size),
    ]
    if trainer.optimizer_monitor_interval:
        callbacks.append(OptimizerMonitor(batch_log_interval=trainer.optimizer_monitor_interval))
    if device == "gpu":
        callbacks.append(MemoryMonitor())
    return callbacks


class CompatWandBLogger(WandBLogger):
    """Composer 0.32's ``WandBLogger`` with recent wandb clients.

    Composer calls ``wandb.run.get_url()``, which wandb removed (0.2x+; the run has a ``url`` property now), so
    the logger failed in ``init`` and the run died: give the run class the old method name before Composer
    needs it. And autoresume asks every logger for the latest checkpoint; W&B holds none unless checkpoints are
    logged as artifacts, and asking needs an API key (fails offline), so say "not found" without asking.
    """

    def download_file(self, remote_file_name: str, destination: str, overwrite: bool = False, progress_bar=True):
        if not self._log_artifacts:
            raise FileNotFoundError(f"{remote_file_name}: checkpoints are not logged to W&B (log_artifacts=False)")
        super().download_file(remote_file_name, destination, overwrite, progress_bar)

    def init(self, state, logger) -> None:
        from wandb.sdk.wandb_run import Run

        if not hasattr(Run, "get_url"):
            Run.get_url = lambda run: run.url
        super().init(state, logger)


def build_loggers(config: RunConfig) -> list[LoggerDestination]:
    """W&B when ``trainer.wandb_project`` is set (``WANDB_MODE=offline`` works), a file logger when asked.

    Console logging is the Trainer's own ``log_to_console``.
    """
    trainer = config.trainer
    loggers: list[LoggerDestination] = []
    if trainer.wandb_project:
        loggers.append(
            CompatWandBLogger(
                project=trainer.wandb_project,
                entity=trainer.wandb_entity,
                name=trainer.run_name,
                init_kwargs={"config": to_dict(config), "dir": os.environ.get("WANDB_DIR")},
            )
        )
    if trainer.log_file:
        loggers.append(FileLogger(filename=trainer.log_file, flush_interval=1))
    return loggers


def build_parallelism(cfg: ParallelismConfig, world_size: int, device: str) -> dict[str, Any] | None:
    """Composer ``parallelism_config``; None means DDP (Composer wraps in DDP whenever world_size > 1).

    FSDP2 (``fully_shard``) is the default and the only FSDP that runs on CPU; HSDP is FSDP with a 2-D device
    mesh: ``replicate_degree`` replicas (typically nodes) each fully sharding the model across its ranks.
    """
    if cfg.strategy in ("none", "ddp"):
        return None
    replicate = cfg.replicate_degree if cfg.strategy == "hsdp" else 1
    if world_size % replicate:
        raise ConfigError(f"parallelism.replicate_degree={replicate} does not divide the world size {world_size}")
    if cfg.fsdp_version == 1:
        if device != "gpu":
            raise ConfigError("parallelism.fsdp_version: FSDP1 needs a GPU in Composer 0.32; use 2 on CPU")
        fsdp = FSDPConfig(
            sharding_strategy="HYBRID_SHARD" if replicate > 1 else "FULL_SHARD",
            data_parallel_replicate_degree=replicate if replicate > 1 else None,
            state_dict_type=cfg.fsdp_state_dict_type,
            activation_checkpointing=cfg.activation_checkpointing,
            mixed_precision="DEFAULT",
        )
        return {"fsdp": fsdp}
    mesh = None
    if replicate > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(
            "cuda" if device == "gpu" else "cpu",
            (replicate, world_size // replicate),
            mesh_dim_names=("dp_replicate", "dp_shard"),
        )
    fsdp2 = FSDP2Config(
        device_mesh=mesh,
        state_dict_type=cfg.fsdp_state_dict_type,
        activation_checkpointing=cfg.activation_checkpointing,
    )
    return {"fsdp": fsdp2}
