"""``train(config)``: everything ``launch/train.py`` runs, top-down, for either engine.

The shared part (labels -> model config, collator, streaming loaders, model wrapper) is built here once; the
Composer engine hands it to ``composer.Trainer`` (DDP / FSDP2 / HSDP, checkpoints, autoresume, loggers), the
DeepSpeed engine (``ddsc.train.deepspeed_engine``) runs its own loop over the same objects.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from composer.utils import dist

from ddsc.config import ConfigError
from ddsc.data.collator import CellCollator
from ddsc.data.labels import LabelVocab
from ddsc.data.remote import is_url
from ddsc.data.schema import LABELS_FILE, VOCAB_FILE
from ddsc.data.streaming import build_dataloader, check_streams
from ddsc.model.config import ModelConfig
from ddsc.train.assets import all_local, fetch_assets, local_path, needed
from ddsc.train.config import RunConfig


@dataclass
class TrainSummary:
    """What a finished run reports: where it stands and its last metrics."""

    batches: int
    samples: int
    wall_s: float
    metrics: dict[str, float]
    already_complete: bool = False  # an autoresumed run whose checkpoint had reached trainer.max_duration

    def format(self) -> str:
        if self.already_complete:
            return f"run already complete: {self.batches} batches ({self.samples} cells) trained; nothing to do"
        parts = [f"{k}={v:.4f}" for k, v in sorted(self.metrics.items())]
        return f"trained {self.batches} batches ({self.samples} cells) in {self.wall_s:.1f}s: " + " ".join(parts)


def hf_export_folder(config: RunConfig) -> Path:
    """Where periodic HF exports go: ``save_folder/hf/ba{N}`` (a filesystem path)."""
    from ddsc.train.run_folder import resolve_save_folder

    save_folder = resolve_save_folder(config)
    if save_folder is None or is_url(save_folder):
        raise ConfigError("trainer.hf_export_interval: needs a filesystem trainer.save_folder (exports go to hf/)")
    return Path(save_folder) / "hf"


def load_labels(config: RunConfig) -> LabelVocab | None:
    """The label vocabulary (local, or fetched by ``fetch_assets``); None for a model without conditions."""
    if not config.model.conditions:
        return None
    path = local_path(config, LABELS_FILE)
    try:
        return LabelVocab.from_json(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data.labels: {err}") from None


def resolve_model_config(model: ModelConfig, labels: LabelVocab | None) -> ModelConfig:
    """Fill each condition's ``num_labels`` from the label vocabulary (a set value must agree with it)."""
    conditions = []
    for cond in model.conditions:
        if labels is None:
            raise ConfigError(f"model.conditions: '{cond.name}' needs data.labels")
        try:
            n = labels.num_labels(cond.name)
        except KeyError:
            raise ConfigError(f"model.conditions: '{cond.name}' is not a column of data.labels") from None
        if cond.num_labels not in (0, n):
            raise ConfigError(f"model.conditions.{cond.name}.num_labels={cond.num_labels} but labels.json has {n}")
        conditions.append(dataclasses.replace(cond, num_labels=n))
    return dataclasses.replace(model, conditions=conditions)


def resolve_run_config(config: RunConfig) -> RunConfig:
    """The config as it will be saved: label counts filled in, so the checkpoint is self-describing."""
    return dataclasses.replace(config, model=resolve_model_config(config.model, load_labels(config)))


def device_batch_size(config: RunConfig, world_size: int) -> int:
    batch = config.trainer.global_train_batch_size
    if batch % world_size:
        raise ConfigError(f"trainer.global_train_batch_size={batch} is not divisible by the {world_size} ranks")
    return batch // world_size


def build_loaders(config: RunConfig, world_size: int):
    """(train loader, eval loader or None) over the MDS streams, batched per rank."""
    data = config.data
    collator = CellCollator(
        max_length=data.max_length,
        binning=data.binning,
        labels=load_labels(config),
        conditions=[c.name for c in config.model.conditions],
        seed=config.trainer.seed,
        gene_vocab_size=config.model.gene_vocab_size,
    )
    train = build_dataloader(data, data.train_split, device_batch_size(config, world_size), collator, train=True)
    evaluation = None
    if data.eval_split:
        batch = config.trainer.device_eval_batch_size
        evaluation = build_dataloader(data, data.eval_split, batch, collator, train=False)
    return train, evaluation


def build_preview(config: RunConfig, eval_loader):
    """The sampling preview on the first ``trainer.preview_cells`` cells of the evaluation split."""
    from ddsc.train.preview import SamplingPreview

    trainer = config.trainer
    dataset = eval_loader.dataset
    cells = [dataset[i] for i in range(min(trainer.preview_cells, dataset.num_samples))]
    return SamplingPreview(
        trainer.preview_interval,
        eval_loader.collate_fn(cells),
        config.diffusion,
        method=trainer.preview_method,
        steps=trainer.preview_steps,
        seed=trainer.seed,
    )


def check_gene_vocab(config: RunConfig) -> None:
    """The gene embedding must cover every token id of the data's vocabulary, or training would fail with an
    index error at the first cell holding a gene beyond it (checked when the vocabulary file is local)."""
    from ddsc.data.vocab import GeneVocab

    path = local_path(config, VOCAB_FILE)
    if not Path(path).is_file():
        raise ConfigError(f"data.vocab: {path} not found (the gene vocabulary data_prep writes beside the splits)")
    needed = len(GeneVocab.from_json(path))
    if needed > config.model.gene_vocab_size:
        raise ConfigError(
            f"model.gene_vocab_size={config.model.gene_vocab_size} is smaller than the gene vocabulary {path} "
            f"(token ids up to {needed - 1}): set model.gene_vocab_size={needed}"
        )


def check_data(config: RunConfig) -> None:
    """Cheap checks of the data paths, run by ``launch/train.py`` before any process group exists.

    Checks that need the label or gene vocabulary run here when those files are local; remote ones are
    fetched once the process group exists, and ``check_run`` then runs in ``train``.
    """
    from ddsc.data.check import verify_local_shards

    check_streams(config.data, config.data.train_split)
    if config.data.eval_split:
        check_streams(config.data, config.data.eval_split)
    verify_local_shards(config.data)  # with data.validate_hash
    if config.parallelism.engine == "deepspeed":
        from ddsc.train.deepspeed_engine import check_deepspeed

        check_deepspeed(config)
    if config.trainer.preview_interval and not config.data.eval_split:
        raise ConfigError("trainer.preview_interval: the sampling preview needs data.eval_split (held-out cells)")
    if config.trainer.hf_export_interval:
        hf_export_folder(config)
    for name in needed(config):
        local_path(config, name)  # a remote file needs a cache folder
    if all_local(config):
        check_run(config)


def check_run(config: RunConfig) -> RunConfig:
    """The resolved config, after the checks that need the vocabularies and the saved run's config."""
    from ddsc.train.run_folder import check_compatible, read_saved_config, resolve_save_folder

    resolved = resolve_run_config(config)
    check_gene_vocab(config)
    save_folder = resolve_save_folder(config)
    if save_folder and config.trainer.autoresume:
        saved = read_saved_config(save_folder)
        if saved is not None:
            check_compatible(saved, resolved)
    return resolved


def train(config: RunConfig) -> TrainSummary:
    """Train with the configured engine (each creates its process group, then calls ``prepare_run``)."""
    if config.parallelism.engine == "deepspeed":
        from ddsc.train.deepspeed_engine import train_deepspeed

        return train_deepspeed(config)
    return _train_composer(config)


def prepare_run(config: RunConfig) -> RunConfig:
    """Once the process group exists: fetch remote vocabularies, check, and resolve the config."""
    fetch_assets(config)
    return check_run(config)


def _train_composer(config: RunConfig) -> TrainSummary:
    from composer import Trainer
    from composer.utils import get_device, reproducibility

    from ddsc.train.builders import (
        build_algorithms,
        build_callbacks,
        build_loggers,
        build_optimizer,
        build_parallelism,
        build_scheduler,
        resolve_device,
        resolve_precision,
    )
    from ddsc.train.callbacks import ResetEvalNoise, SaveResolvedConfig, SeedEachBatch
    from ddsc.train.checkpoint_integrity import composer_folder, recover_on_rank_zero
    from ddsc.train.composer_model import DDSCComposerModel
    from ddsc.train.console import MetricLines
    from ddsc.train.run_folder import composer_resume_path, resolve_save_folder

    trainer_cfg, par = config.trainer, config.parallelism
    device = resolve_device(trainer_cfg)
    world_size = dist.get_world_size()
    parallelism = None
    if world_size > 1 or par.strategy in ("fsdp", "hsdp"):
        # Before the loaders: Streaming registers its shared memory with barriers (racy without a process
        # group), and HSDP's device mesh needs the group too.
        dist.initialize_dist(get_device(device))
    precision, autocast_dtype = resolve_precision(trainer_cfg, device)  # after the group: one choice for all
    config = prepare_run(config)
    if par.strategy in ("fsdp", "hsdp"):
        parallelism = build_parallelism(par, world_size, device)

    save_folder = resolve_save_folder(config)
    if save_folder and trainer_cfg.autoresume and not is_url(save_folder):
        recover_on_rank_zero(composer_folder(save_folder), dist.get_global_rank(), dist.barrier)
    callbacks = [*build_callbacks(trainer_cfg, device), ResetEvalNoise(), SeedEachBatch(trainer_cfg.seed)]
    if save_folder:
        callbacks.append(SaveResolvedConfig(config, save_folder))
    if trainer_cfg.hf_export_interval:
        from ddsc.data.vocab import GeneVocab
        from ddsc.train.hf_export_callback import HFExport

        vocab = GeneVocab.from_json(local_path(config, VOCAB_FILE))
        export = HFExport(trainer_cfg.hf_export_interval, hf_export_folder(config), config, vocab, load_labels(config))
        callbacks.append(export)

    train_loader, eval_loader = build_loaders(config, world_size)
    if trainer_cfg.preview_interval:
        callbacks.append(build_preview(config, eval_loader))
    reproducibility.seed_all(trainer_cfg.seed)  # same initial weights on every rank and in every rerun
    model = DDSCComposerModel(config.model, config.diffusion, autocast_dtype)
    if par.compile:
        model.model.compile_blocks()
    if par.activation_checkpointing and parallelism is None:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        apply_activation_checkpointing(model.model, check_fn=model.model.activation_checkpointing_fn)
    optimizer = build_optimizer(config.optimizer, model, device)
    loggers = build_loggers(config)
    if trainer_cfg.log_to_console:
        loggers.append(MetricLines(trainer_cfg.console_log_interval))

    trainer = Trainer(
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=eval_loader,
        eval_interval=trainer_cfg.eval_interval,
        eval_subset_num_batches=config.trainer.eval_subset_num_batches,
        max_duration=trainer_cfg.max_duration,
        optimizers=optimizer,
        schedulers=build_scheduler(config.scheduler),
        step_schedulers_every_batch=True,
        device=device,
        precision=precision,
        parallelism_config=parallelism,
        device_train_microbatch_size=trainer_cfg.device_train_microbatch_size,
        algorithms=build_algorithms(trainer_cfg),
        callbacks=callbacks,
        loggers=loggers,
        run_name=trainer_cfg.run_name,
        seed=trainer_cfg.seed,
        save_folder=save_folder,
        save_interval=trainer_cfg.save_interval,
        save_num_checkpoints_to_keep=trainer_cfg.save_num_checkpoints_to_keep,
        # Autoresume: Composer's own for object stores, our explicit load_path for filesystem folders (shared
        # by several nodes, Composer's fails; see run_folder.composer_resume_path).
        autoresume=trainer_cfg.autoresume and save_folder is not None and is_url(save_folder),
        load_path=composer_resume_path(save_folder, trainer_cfg.autoresume),
        # A crash can leave a checkpoint newer than the one `latest` points to (killed before the symlink
        # moved); the resumed run recomputes those batches and must be allowed to replace that file.
        save_overwrite=trainer_cfg.autoresume,
        log_to_console=False,  # its console logger prints every value on a line: MetricLines instead
        progress_bar=trainer_cfg.progress_bar,
    )
    state = trainer.state
    if state.max_duration <= state.timestamp.get(state.max_duration.unit):  # resumed at the end: Composer refuses
        trainer.close()
        return TrainSummary(int(state.timestamp.batch), int(state.timestamp.sample), 0.0, {}, already_complete=True)
    start = time.perf_counter()
    trainer.fit()
    metrics = {f"train/{k}": float(m.compute()) for k, m in state.train_metrics.items()}
    for label, group in state.eval_metrics.items():
        metrics.update({f"{label}/{k}": float(m.compute()) for k, m in group.items()})
    summary = TrainSummary(
        batches=int(state.timestamp.batch),
        samples=int(state.timestamp.sample),
        wall_s=time.perf_counter() - start,
        metrics=metrics,
    )
    trainer.close()
    return summary
