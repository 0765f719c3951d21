"""The run configuration: one typed tree per training run (``yamls/*.yaml`` + ``key=value`` overrides).

``family`` picks the model family: ``masked`` (the masked discrete DiT: ``model`` + ``diffusion``), or the
latent family's two stages, ``latent_vae`` (the cell VAE: ``latent_vae``) and ``latent_dit`` (a flow DiT over a
trained VAE's latents: ``latent_dit``, whose ``latent_vae`` section is read from the VAE run). Every family
reads ``data`` and, from ``model``, the gene vocabulary size and the conditions (what the collator and the
label vocabulary need); the sections of the other families are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ddsc.config import ConfigError
from ddsc.data.config import DataConfig
from ddsc.diffusion.config import DiffusionConfig
from ddsc.diffusion.sampler_names import Method
from ddsc.latent.config import LatentDiTConfig, LatentVAEConfig
from ddsc.model.config import ModelConfig


@dataclass
class OptimizerConfig:
    """AdamW; ``weight_decay`` is decoupled from the LR for both names (see ``builders.build_optimizer``)."""

    name: Literal["decoupled_adamw", "adamw"] = "decoupled_adamw"
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class SchedulerConfig:
    name: Literal["cosine_with_warmup", "linear_with_warmup", "constant_with_warmup"] = "cosine_with_warmup"
    t_warmup: str = "100ba"
    alpha_f: float = 0.1


@dataclass
class ParallelismConfig:
    """Which engine and how the model is sharded."""

    engine: Literal["composer", "deepspeed"] = "composer"
    strategy: Literal["none", "ddp", "fsdp", "hsdp"] = "none"  # composer engine only
    fsdp_version: Literal[1, 2] = 2
    replicate_degree: int = 1  # hsdp: number of replicas (e.g. nodes); shards within each
    zero_stage: Literal[0, 1, 2, 3] = 2  # deepspeed engine only
    offload_optimizer: bool = False
    offload_params: bool = False
    fsdp_state_dict_type: Literal["sharded", "full"] = "sharded"  # sharded: each rank saves its own shard
    activation_checkpointing: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.replicate_degree < 1:
            raise ConfigError(f"parallelism.replicate_degree: must be >= 1, got {self.replicate_degree}")
        if self.engine == "deepspeed" and self.strategy not in ("none", "ddp"):
            raise ConfigError(
                f"parallelism.strategy: '{self.strategy}' is a composer-engine strategy; the deepspeed engine "
                "shards with parallelism.zero_stage"
            )
        if self.strategy == "hsdp" and self.replicate_degree < 2:
            raise ConfigError("parallelism.replicate_degree: hsdp needs >= 2 replicas (e.g. the number of nodes)")


@dataclass
class TrainerConfig:
    run_name: str = "ddsc"
    max_duration: str = "1000ba"
    global_train_batch_size: int = 256
    device_train_microbatch_size: int | Literal["auto"] = 32
    device_eval_batch_size: int = 32
    eval_interval: str = "500ba"
    # Batches per rank of each evaluation (-1: the whole eval split). Cap it on large data: a 1% split of
    # Tahoe-100M is 1M cells, which evaluated in full every eval_interval would cost a tenth of the run.
    eval_subset_num_batches: int = -1
    precision: Literal["auto", "fp32", "amp_bf16", "amp_fp16"] = "auto"  # auto: bf16 where supported
    grad_clip_norm: float = 1.0
    ema_decay: float | None = None
    seed: int = 17
    device: Literal["auto", "cpu", "gpu"] = "auto"
    save_folder: str | None = None  # local path or object store URI
    save_interval: str = "500ba"
    save_num_checkpoints_to_keep: int = 3
    autoresume: bool = False
    hf_export_interval: str | None = None
    # Sampling preview (ddsc.train.preview): every N batches generate preview_cells held-out cells and log
    # bin statistics against the real ones. None: off.
    preview_interval: str | None = None
    preview_cells: int = 8
    preview_steps: int = 16
    preview_method: Method = "first_hitting"
    log_to_console: bool = True  # one line of metrics per console_log_interval (ddsc.train.console.MetricLines)
    console_log_interval: str = "10ba"
    # Every N batches, per-parameter gradient / weight norms (Composer's OptimizerMonitor) for W&B and log_file
    # (never printed on the console). None: off.
    optimizer_monitor_interval: int | None = None
    log_file: str | None = None  # also write every logged metric to this file (Composer FileLogger)
    # Peak FLOP/s of one device for MFU. GPUs are detected by Composer; set this on CPU (or unknown GPUs).
    peak_flops_per_device: float | None = None
    speed_window_size: int = 10  # batches averaged by the speed monitor
    wandb_project: str | None = None  # set to log to Weights & Biases (WANDB_MODE=offline works)
    wandb_entity: str | None = None
    progress_bar: bool = True


Family = Literal["masked", "latent_vae", "latent_dit"]


@dataclass
class RunConfig:
    data: DataConfig
    family: Family = "masked"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    latent_vae: LatentVAEConfig = field(default_factory=LatentVAEConfig)
    latent_dit: LatentDiTConfig = field(default_factory=LatentDiTConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        batch, micro = self.trainer.global_train_batch_size, self.trainer.device_train_microbatch_size
        if batch < 1:
            raise ConfigError(f"trainer.global_train_batch_size: must be positive, got {batch}")
        if micro == "auto" and not (self.parallelism.strategy == "fsdp" and self.parallelism.fsdp_version == 1):
            raise ConfigError("trainer.device_train_microbatch_size: 'auto' needs parallelism fsdp_version 1 (GPU)")
        if self.family != "masked":
            self._check_latent()
        if self.model.num_bins != self.data.binning.num_bins:
            raise ConfigError(
                f"model.num_bins={self.model.num_bins} must equal data.binning.num_bins={self.data.binning.num_bins}"
            )

    def _check_latent(self) -> None:
        """What the latent family does not support yet stops the run here, naming the key."""
        if self.trainer.preview_interval:
            raise ConfigError(f"trainer.preview_interval: not available for family {self.family} yet (set it to null)")
        if self.trainer.hf_export_interval and self.family == "latent_vae":
            raise ConfigError(
                "trainer.hf_export_interval: a latent_vae run has no model folder of its own (the latent_dit run's "
                "export holds the VAE); set it to null"
            )
        if self.family == "latent_dit" and not self.latent_dit.vae:
            raise ConfigError("latent_dit.vae: family latent_dit needs the VAE run (its save folder or checkpoint)")
