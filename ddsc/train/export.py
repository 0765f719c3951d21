"""``ddsc export``: a training checkpoint (Composer monolithic / sharded, DeepSpeed ZeRO) -> a Hugging Face folder.

The checkpoint's run is resolved as training resolved it (``ddsc.train.run``: labels, condition sizes, remote
vocabularies), its weights read without a process group (``ddsc.train.checkpoints``) and written by
``ddsc.model.export.write_hf_folder``. A latent-family run goes to ``ddsc.train.latent_export``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ddsc.config import load_config
from ddsc.data.labels import LabelVocab
from ddsc.data.schema import LABELS_FILE, VOCAB_FILE
from ddsc.data.vocab import GeneVocab
from ddsc.done import StepInputs
from ddsc.model.export import hf_config_from_run, write_hf_folder
from ddsc.model.hf import DDSCModel
from ddsc.train.assets import fetch_assets, local_path
from ddsc.train.checkpoints import (
    checkpoint_kind,
    find_run_config,
    load_exactly,
    read_model_state,
    resolve_checkpoint,
    verify_checkpoint,
)
from ddsc.train.config import RunConfig
from ddsc.train.run import load_labels, resolve_gene_vocab_size, resolve_model_config


@dataclass
class ExportSummary:
    out: Path
    checkpoint_kind: str
    num_params: int
    genes: int
    conditions: dict[str, str]  # name -> "N labels" / "molecule" / "scalar"
    up_to_date: bool = False  # the folder was already exported from the same files: nothing written

    def format(self) -> str:
        if self.up_to_date:
            return f"{self.out} is up to date with its {self.checkpoint_kind} checkpoint; nothing to do"
        conds = ", ".join(f"{k} ({v})" for k, v in self.conditions.items()) or "none"
        return (
            f"exported {self.checkpoint_kind} checkpoint -> {self.out}: {self.num_params:,} parameters, "
            f"{self.genes:,} genes in the vocabulary, conditions: {conds}"
        )


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    config_path: str | Path | None = None,
    vocab_path: str | Path | None = None,
    labels_path: str | Path | None = None,
) -> ExportSummary:
    """Export a Composer (monolithic / sharded) or DeepSpeed ZeRO checkpoint to an HF folder.

    The run config defaults to ``config.yaml`` in the run's save folder, the vocabulary and labels to the
    files beside the training data (``data.labels`` for the labels when set). A folder already exported from
    the same files (``ddsc.done``) is left as it is.
    """
    kind = checkpoint_kind(checkpoint)
    verify_checkpoint(checkpoint)  # first: a corrupt checkpoint is the problem to report, whatever else is
    config_path = config_path or find_run_config(checkpoint)
    if config_path is None:
        raise FileNotFoundError(f"{checkpoint}: no config.yaml in the save folder; pass the run config (--config)")
    run = load_config(RunConfig, config_path)
    if run.family == "latent_vae":
        raise ValueError(
            f"{checkpoint}: a latent_vae run; export the latent_dit run trained on it (its checkpoints hold the VAE)"
        )
    run, vocab, labels, inputs = resolve_export(run, checkpoint, config_path, vocab_path, labels_path)
    if inputs.done_in(out):
        return ExportSummary(Path(out), kind, 0, vocab.num_genes, {}, up_to_date=True)
    if run.family == "latent_dit":
        from ddsc.train.latent_export import export_latent

        num_params = export_latent(checkpoint, out, run, vocab, labels, config_path)
    else:
        num_params = export_masked(checkpoint, out, run, vocab, labels, config_path)
    inputs.mark_done(out)
    return ExportSummary(Path(out), kind, num_params, vocab.num_genes, condition_summary(run))


def export_masked(checkpoint, out, run: RunConfig, vocab: GeneVocab, labels: LabelVocab | None, config_path) -> int:
    """Write the masked DiT of ``checkpoint`` as an HF folder; its parameter count."""
    state = read_model_state(checkpoint, verify=False)
    model = DDSCModel(hf_config_from_run(run))
    load_exactly(model.dit, state, f"{checkpoint}: weights do not match the run config {config_path}")
    write_hf_folder(model, out, vocab, labels, run)
    return model.dit.num_params()


def condition_summary(run: RunConfig) -> dict[str, str]:
    return {c.name: f"{c.num_labels} labels" if c.kind == "label" else c.kind for c in run.model.conditions}


def resolve_export(
    run: RunConfig, checkpoint, config_path, vocab_path, labels_path
) -> tuple[RunConfig, GeneVocab, LabelVocab | None, StepInputs]:
    """The run as training resolved it (labels, condition sizes, remote vocabularies), its gene vocabulary and
    labels, and the export's inputs (``ddsc.done``: a folder exported from the same files is up to date)."""
    data = dataclasses.replace(
        run.data,
        labels=str(labels_path) if labels_path else run.data.labels,
        vocab=str(vocab_path) if vocab_path else run.data.vocab,
    )
    run = dataclasses.replace(run, data=data)
    fetch_assets(run)  # remote vocabularies (the data in object storage) into the run's cache folder
    labels = load_labels(run)  # data.labels, else labels.json beside the data when the model has conditions
    vocab_path = local_path(run, VOCAB_FILE)
    if not Path(vocab_path).is_file():
        raise FileNotFoundError(f"gene vocabulary not found ({vocab_path}); pass --vocab")
    vocab = GeneVocab.from_json(vocab_path)
    model = resolve_model_config(run.model, labels)  # as training resolves them (a yaml may leave both to the data)
    run = dataclasses.replace(
        run, model=dataclasses.replace(model, gene_vocab_size=resolve_gene_vocab_size(model, vocab, run))
    )
    labels_file = local_path(run, LABELS_FILE) if run.model.conditions else None
    inputs = StepInputs.of([resolve_checkpoint(checkpoint), config_path, vocab_path, labels_file], {})
    return run, vocab, labels, inputs
