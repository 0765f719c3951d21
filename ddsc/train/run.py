"""The run resolved once, for both engines and the HF-export callback: a ``ResolvedRun``.

A ``RunConfig`` as written names files; a run needs what they hold: the label vocabulary (condition sizes), the
gene vocabulary (the embedding size), the saved run's config (what may not change on resume) and, on CPU, the
precision the run settled on. ``prepare_run`` reads and checks all of it once the process group exists and
returns the config as the run saves it together with the vocabularies it read; ``build_loaders`` turns that
into the streaming loaders both engines iterate. Nothing downstream re-reads ``labels.json`` or ``vocab.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from composer.utils import dist

from ddsc.config import ConfigError
from ddsc.data.collator import CellCollator
from ddsc.data.labels import LabelVocab
from ddsc.data.remote import is_url
from ddsc.data.schema import LABELS_FILE, VOCAB_FILE
from ddsc.data.streaming import build_dataloader
from ddsc.data.vocab import GeneVocab
from ddsc.model.conditions import ConditionValueError, encode_values
from ddsc.model.config import ModelConfig
from ddsc.train.assets import fetch_assets, local_path
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


@dataclass(frozen=True)
class ResolvedRun:
    """A run as training uses it: ``config`` as saved (condition sizes and ``model.gene_vocab_size`` filled in
    from the data, a ``latent_dit`` run's VAE section, on CPU the settled precision) and the vocabularies read."""

    config: RunConfig
    vocab: GeneVocab
    labels: LabelVocab | None


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
    """Fill each label condition's ``num_labels`` from the label vocabulary (a set value must agree with it),
    and a kernel molecule condition's ``references`` (its column's distinct SMILES) when they are not set."""
    conditions = []
    for cond in model.conditions:
        if cond.kind == "molecule" and cond.encoder == "kernel" and not cond.references:
            if labels is None or cond.source not in labels.labels:
                raise ConfigError(f"model.conditions.{cond.name}: a kernel encoder needs data.labels[{cond.source!r}]")
            cond = dataclasses.replace(cond, references=list(labels.labels[cond.source]))
        if cond.kind != "label":
            conditions.append(cond)
            continue
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


def check_condition_values(model: ModelConfig, labels: LabelVocab | None) -> None:
    """Every distinct value (``labels.json``) of a molecule or scalar condition's column must encode.

    Checked before training, so that an unparsable SMILES or a non-numeric dose stops the run at once, naming
    the value and how many distinct values are affected, instead of at the first such cell mid-epoch (the
    collator's error names that cell; it is what a dataset without a complete ``labels.json`` would meet).
    """
    for spec in model.conditions:
        if spec.kind == "label":
            continue
        where = f"model.conditions.{spec.name}"
        if labels is None or spec.source not in labels.labels:
            raise ConfigError(
                f"{where}: data.labels has no {spec.source!r} column, whose distinct values are checked before "
                "training (convert the data again: data_prep lists them in labels.json)"
            )
        values = labels.labels[spec.source]
        bad = []
        for value in values:
            try:
                encode_values(spec, [value])
            except ConditionValueError as err:
                bad.append(str(err))
        if bad:
            raise ConfigError(
                f"{where}: {len(bad)} of {len(values)} distinct values of column {spec.source!r} cannot be encoded "
                f"(first: {bad[0]}); fix or drop those cells"
            )


def resolve_run(config: RunConfig) -> ResolvedRun:
    """The config as it will be saved, so the checkpoint is self-describing: label counts and the gene vocabulary
    size filled in, every molecule / scalar value of the data checked to encode (``check_condition_values``) and,
    for ``latent_dit``, the VAE's section read from its run (``resolve_latent_vae``); with the vocabularies."""
    labels = load_labels(config)
    vocab = load_gene_vocab(config)
    model = resolve_model_config(config.model, labels)
    model = dataclasses.replace(model, gene_vocab_size=resolve_gene_vocab_size(model, vocab, config))
    check_condition_values(model, labels)
    return ResolvedRun(resolve_latent_vae(dataclasses.replace(config, model=model)), vocab, labels)


def resolve_latent_vae(config: RunConfig) -> RunConfig:
    """A ``latent_dit`` run's ``latent_vae`` section is the VAE run's own (its ``config.yaml``), so the run's saved
    config describes the VAE it encodes with; the two runs must share the gene vocabulary."""
    if config.family != "latent_dit":
        return config
    from ddsc.train.latent_models import read_vae_run

    vae_run = read_vae_run(config.latent_dit.vae)
    if vae_run.model.gene_vocab_size != config.model.gene_vocab_size:
        raise ConfigError(
            f"model.gene_vocab_size={config.model.gene_vocab_size} but the VAE run {config.latent_dit.vae} has "
            f"{vae_run.model.gene_vocab_size}: the latent DiT must use the VAE's gene vocabulary"
        )
    return dataclasses.replace(config, latent_vae=vae_run.latent_vae)


def device_batch_size(config: RunConfig, world_size: int) -> int:
    batch = config.trainer.global_train_batch_size
    if batch % world_size:
        raise ConfigError(f"trainer.global_train_batch_size={batch} is not divisible by the {world_size} ranks")
    return batch // world_size


def build_loaders(run: ResolvedRun, world_size: int):
    """(train loader, eval loader or None) over the MDS streams, batched per rank."""
    config = run.config
    data = config.data
    collator = CellCollator(
        max_length=data.max_length,
        binning=data.binning,
        labels=run.labels,
        conditions=config.model.conditions,
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


def load_gene_vocab(config: RunConfig) -> GeneVocab:
    """The data's gene vocabulary (local, or fetched by ``fetch_assets``)."""
    path = local_path(config, VOCAB_FILE)
    if not Path(path).is_file():
        raise ConfigError(f"data.vocab: {path} not found (the gene vocabulary data_prep writes beside the splits)")
    try:
        return GeneVocab.from_json(path)
    except ValueError as err:
        raise ConfigError(f"data.vocab: {err}") from None


def resolve_gene_vocab_size(model: ModelConfig, vocab: GeneVocab, config: RunConfig) -> int:
    """``model.gene_vocab_size``: 0 (the default) takes the vocabulary's size; a set value must cover every token
    id of the vocabulary, or training would fail with an index error at the first cell holding a gene beyond it."""
    needed = len(vocab)
    if model.gene_vocab_size == 0:
        return needed
    if needed > model.gene_vocab_size:
        raise ConfigError(
            f"model.gene_vocab_size={model.gene_vocab_size} is smaller than the gene vocabulary "
            f"{local_path(config, VOCAB_FILE)} (token ids up to {needed - 1}): set model.gene_vocab_size={needed} "
            "or leave it out (0: from the vocabulary)"
        )
    return model.gene_vocab_size


def check_run(config: RunConfig, device: str | None = None) -> ResolvedRun:
    """The resolved run (``resolve_run``), after the check against the saved run's config.

    With the training ``device`` ("cpu" or "gpu"; inside the launched processes), ``precision: auto`` on CPU is
    also settled to the concrete choice (``settle_cpu_precision``), which is what the run then saves.
    """
    from ddsc.train.run_folder import check_compatible, read_saved_config, resolve_save_folder

    run = resolve_run(config)
    save_folder = resolve_save_folder(config)
    saved = read_saved_config(save_folder) if save_folder and config.trainer.autoresume else None
    if saved is not None:
        check_compatible(saved, run.config)
    if device == "cpu" and run.config.trainer.precision == "auto":
        trainer = dataclasses.replace(run.config.trainer, precision=settle_cpu_precision(saved))
        run = dataclasses.replace(run, config=dataclasses.replace(run.config, trainer=trainer))
    return run


def settle_cpu_precision(saved: dict | None) -> str:
    """``precision: auto`` on CPU for this run (``ddsc.precision.cpu_auto_precision``), printed by rank 0."""
    from ddsc.precision import cpu_auto_precision

    choice, why = cpu_auto_precision(((saved or {}).get("trainer") or {}).get("precision"))
    if dist.get_global_rank() == 0:
        print(f"precision auto: {choice} ({why})", flush=True)
    return choice


def prepare_run(config: RunConfig, device: str) -> ResolvedRun:
    """Once the process group exists: fetch remote vocabularies, check, and resolve the config."""
    fetch_assets(config)
    return check_run(config, device)
