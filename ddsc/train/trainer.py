"""``train(config)``: everything ``launch/train.py`` runs, top-down, for either engine.

The shared part (the resolved run, collator, streaming loaders) comes from ``ddsc.train.run``; the Composer
engine (here) hands it to ``composer.Trainer`` (DDP / FSDP2 / HSDP, checkpoints, autoresume, loggers), the
DeepSpeed engine (``ddsc.train.deepspeed_engine``) runs its own loop over the same objects.
"""

from __future__ import annotations

import time

from composer.utils import dist

from ddsc.config import ConfigError
from ddsc.data.remote import is_url
from ddsc.data.streaming import check_streams
from ddsc.train.assets import all_local, local_path, needed
from ddsc.train.config import RunConfig
from ddsc.train.run import (
    TrainSummary,
    build_loaders,
    build_preview,
    check_run,
    hf_export_folder,
    prepare_run,
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


def train(config: RunConfig) -> TrainSummary:
    """Train with the configured engine (each creates its process group, then calls ``prepare_run``)."""
    if config.parallelism.engine == "deepspeed":
        from ddsc.train.deepspeed_engine import train_deepspeed

        return train_deepspeed(config)
    return _train_composer(config)


def _train_composer(config: RunConfig) -> TrainSummary:
    from composer import Trainer
    from composer.utils import get_device, reproducibility

    from ddsc.train.builders import (
        build_algorithms,
        build_callbacks,
        build_composer_model,
        build_loggers,
        build_optimizer,
        build_parallelism,
        build_scheduler,
        resolve_device,
        resolve_precision,
    )
    from ddsc.train.callbacks import ResetEvalNoise, SaveResolvedConfig, SeedEachBatch
    from ddsc.train.checkpoint_integrity import composer_folder, recover_on_rank_zero
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
    run = prepare_run(config, device)  # after the group: one precision choice for all ranks
    config = run.config
    trainer_cfg = config.trainer
    precision, autocast_dtype = resolve_precision(trainer_cfg, device)
    if par.strategy in ("fsdp", "hsdp"):
        parallelism = build_parallelism(par, world_size, device)

    save_folder = resolve_save_folder(config)
    if save_folder and trainer_cfg.autoresume and not is_url(save_folder):
        recover_on_rank_zero(composer_folder(save_folder), dist.get_global_rank(), dist.barrier)
    callbacks = [*build_callbacks(trainer_cfg, device), ResetEvalNoise(), SeedEachBatch(trainer_cfg.seed)]
    if save_folder:
        callbacks.append(SaveResolvedConfig(config, save_folder))
    if trainer_cfg.hf_export_interval:
        from ddsc.train.hf_export_callback import HFExport

        callbacks.append(HFExport(trainer_cfg.hf_export_interval, hf_export_folder(config), run))

    train_loader, eval_loader = build_loaders(run, world_size)
    if trainer_cfg.preview_interval:
        callbacks.append(build_preview(config, eval_loader))
    reproducibility.seed_all(trainer_cfg.seed)  # same initial weights on every rank and in every rerun
    model = build_composer_model(config, autocast_dtype)  # the masked DiT or a latent-family wrapper
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
