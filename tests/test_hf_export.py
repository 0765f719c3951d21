"""HF export: training checkpoints (Composer monolithic / FSDP2 sharded, DeepSpeed ZeRO) -> HF folder -> logits.

The training runs here are real (Composer Trainer, DeepSpeed engine) on a tiny synthetic MDS dataset; the
reference logits come from the in-memory training model or from torch's own checkpoint readers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from without_ddsc import run_without

from ddsc.cli import main as cli_main
from ddsc.config import from_dict
from ddsc.data.collator import CellCollator
from ddsc.data.labels import LabelVocab
from ddsc.data.vocab import GeneVocab
from ddsc.model.export import relative_imports, remote_code_sources
from ddsc.model.hf import DDSCConfig, DDSCModel
from ddsc.train.checkpoints import read_model_state, strip_wrappers
from ddsc.train.config import RunConfig
from ddsc.train.export import export_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from train_data import write_mds  # noqa: E402

N_GENES = 200
REPO = Path(__file__).resolve().parents[1]


def run_config(data: Path, save_folder: Path, **parallelism) -> RunConfig:
    return from_dict(
        RunConfig,
        {
            "data": {
                "streams": {"a": {"local": str(data)}},
                "max_length": 32,
                "num_workers": 0,
                "binning": {"num_bins": 8},
            },
            "model": {
                "d_model": 32,
                "n_layers": 2,
                "n_heads": 4,
                "num_bins": 8,
                "gene_vocab_size": N_GENES,
                "conditions": [{"name": "cell_line_id"}, {"name": "drug"}],
            },
            "optimizer": {"lr": 0.01},
            "scheduler": {"t_warmup": "0ba", "name": "constant_with_warmup"},
            "trainer": {
                "max_duration": "3ba",
                "global_train_batch_size": 8,
                "device_train_microbatch_size": 8,
                "save_folder": str(save_folder),
                "save_interval": "3ba",
                "eval_interval": "3ba",
                "progress_bar": False,
                "log_to_console": False,
                "hf_export_interval": "2ba",
            },
            "parallelism": parallelism,
        },
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = write_mds(tmp_path_factory.mktemp("mds"), genes=N_GENES)
    GeneVocab.from_features(
        [f"ENSG{i:011d}" for i in range(N_GENES - 3)], [f"G{i}" for i in range(N_GENES - 3)]
    ).to_json(root / "vocab.json")
    return root


def a_batch(data: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A collated batch of 6 synthetic cells with part of the expression masked, conditions set."""
    rng = np.random.default_rng(seed)
    samples = [
        {
            "genes": rng.choice(np.arange(3, N_GENES), 20, replace=False).astype(np.int32),
            "counts": rng.integers(1, 20, 20).astype(np.int32),
            "cell_line_id": "CVCL_B",
            "drug": "drugX",
        }
        for _ in range(6)
    ]
    from ddsc.data.binning_config import BinningConfig

    collator = CellCollator(
        32, BinningConfig(num_bins=8), LabelVocab.from_json(data / "labels.json"), ["cell_line_id", "drug"]
    )
    batch = collator(samples)
    batch["expr"] = batch["expr"].masked_fill(batch["real"] & (torch.rand(batch["real"].shape) < 0.5), 8)
    return batch


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(batch["gene_ids"], batch["expr"], batch["attention_mask"], batch["cond"])


@pytest.fixture(scope="module")
def composer_run(data, tmp_path_factory):
    """A real Composer Trainer run (monolithic checkpoint + HFExport callback); returns its in-memory model."""
    from composer import Trainer

    from ddsc.train.builders import build_optimizer, build_scheduler
    from ddsc.train.callbacks import SaveResolvedConfig
    from ddsc.train.composer_model import DDSCComposerModel
    from ddsc.train.hf_export_callback import HFExport
    from ddsc.train.run import build_loaders, resolve_run

    save = tmp_path_factory.mktemp("run")
    run = resolve_run(run_config(data, save))
    config = run.config
    train_loader, _ = build_loaders(run, world_size=1)
    model = DDSCComposerModel(config.model, config.diffusion)
    export = HFExport("2ba", save / "hf", run)
    trainer = Trainer(
        model=model,
        train_dataloader=train_loader,
        max_duration="3ba",
        optimizers=build_optimizer(config.optimizer, model, "cpu"),
        schedulers=build_scheduler(config.scheduler),
        callbacks=[SaveResolvedConfig(config, str(save)), export],
        save_folder=str(save),
        save_interval="3ba",
        progress_bar=False,
        seed=17,
    )
    trainer.fit()
    trainer.close()
    return save, model.model, export


def test_composer_checkpoint_export_matches_training_model(composer_run, data, tmp_path):
    save, trained, _ = composer_run
    summary = export_checkpoint(save / "latest-rank0.pt", tmp_path / "hf")
    assert summary.checkpoint_kind == "composer"
    exported = DDSCModel.from_pretrained(tmp_path / "hf")
    batch = a_batch(data)
    reference = logits(trained, batch)
    assert reference.abs().max() > 1e-3  # trained weights, not the zero-initialised head
    torch.testing.assert_close(logits(exported, batch), reference, rtol=0, atol=0)
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "vocab.json",
        "labels.json",
        "train_config.yaml",
        "hf.py",
        "dit.py",
        "config.py",
        "tokens.py",
    } <= files
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "hf.DDSCConfig", "AutoModel": "hf.DDSCModel"}
    assert config["max_genes"] == 32 and config["binning"]["num_bins"] == 8
    assert [c["num_labels"] for c in config["conditions"]] == [3, 2]
    # the save folder stands for its newest checkpoint
    assert export_checkpoint(save, tmp_path / "hf_from_folder").checkpoint_kind == "composer"
    torch.testing.assert_close(
        logits(DDSCModel.from_pretrained(tmp_path / "hf_from_folder"), batch), reference, rtol=0, atol=0
    )


def test_export_with_a_yaml_that_leaves_sizes_to_the_data(composer_run, data, tmp_path):
    """``--config`` may name a yaml whose ``model.gene_vocab_size`` is 0 (from vocab.json) and whose label counts
    are unset: export resolves both from the data files, as training does, and gets the trained weights."""
    import yaml

    save, trained, _ = composer_run
    raw = yaml.safe_load((save / "config.yaml").read_text())
    resolved = raw["model"]["gene_vocab_size"], [c["num_labels"] for c in raw["model"]["conditions"]]
    assert resolved[0] > 0 and all(n > 0 for n in resolved[1])
    raw["model"]["gene_vocab_size"] = 0
    for condition in raw["model"]["conditions"]:
        condition["num_labels"] = 0
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    export_checkpoint(save / "latest-rank0.pt", tmp_path / "hf", config_path=tmp_path / "run.yaml")
    exported = DDSCModel.from_pretrained(tmp_path / "hf")
    assert (exported.config.gene_vocab_size, [c["num_labels"] for c in exported.config.conditions]) == resolved
    batch = a_batch(data)
    torch.testing.assert_close(logits(exported, batch), logits(trained, batch), rtol=0, atol=0)


def test_callback_exports_match_training_model(composer_run, data):
    save, trained, export = composer_run
    assert [p.name for p in export.exported] == ["ba2", "ba3"]  # every 2 batches, and at the end
    batch = a_batch(data, seed=1)
    final = DDSCModel.from_pretrained(save / "hf" / "ba3")
    torch.testing.assert_close(logits(final, batch), logits(trained, batch), rtol=0, atol=0)
    earlier = DDSCModel.from_pretrained(save / "hf" / "ba2")
    assert not torch.equal(logits(earlier, batch), logits(final, batch))


def test_save_pretrained_round_trip(composer_run, data, tmp_path):
    save, _, _ = composer_run
    model = DDSCModel.from_pretrained(save / "hf" / "ba3")
    model.save_pretrained(tmp_path / "again")
    again = DDSCModel.from_pretrained(tmp_path / "again")
    assert isinstance(again.config, DDSCConfig)
    assert again.config.to_diff_dict() == model.config.to_diff_dict()  # (to_dict also holds the source path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    from transformers import AutoConfig, AutoModel

    auto = AutoModel.from_pretrained(tmp_path / "again")  # registered with the Auto classes by ddsc
    assert type(auto) is DDSCModel and type(AutoConfig.from_pretrained(tmp_path / "again")) is DDSCConfig
    batch = a_batch(data)
    torch.testing.assert_close(logits(auto, batch), logits(model, batch), rtol=0, atol=0)


def test_remote_code_loads_without_ddsc(composer_run, data, tmp_path):
    """AutoModel(trust_remote_code=True) in a process where ``import ddsc`` fails gives the same logits."""
    save, _, _ = composer_run
    folder = save / "hf" / "ba3"
    batch = a_batch(data)
    np.savez(tmp_path / "batch.npz", **{k: batch[k].numpy() for k in ("gene_ids", "expr", "attention_mask", "cond")})
    script = textwrap.dedent(f"""
        try:
            import ddsc
            sys.exit("ddsc is importable")
        except ModuleNotFoundError:
            pass
        import numpy as np, torch, transformers
        model = transformers.AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        b = {{k: torch.from_numpy(v) for k, v in np.load({str(tmp_path / "batch.npz")!r}).items()}}
        with torch.no_grad():
            out = model(b["gene_ids"], b["expr"], b["attention_mask"], b["cond"])
        np.save({str(tmp_path / "logits.npy")!r}, out.numpy())
        assert not any(m == "ddsc" or m.startswith("ddsc.") for m in sys.modules)
        print(type(model).__module__)
    """)
    done = run_without(script, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("transformers_modules.")
    reference = logits(DDSCModel.from_pretrained(folder), batch).numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), reference)


def test_fsdp2_sharded_checkpoint_export(data, tmp_path):
    """The real trainer with FSDP2 and sharded checkpoints; weights compared with torch's DCP -> torch.save."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    save = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_hf_export import run_config
        from pathlib import Path
        from ddsc.train.trainer import train
        train(run_config(Path({str(data)!r}), Path({str(save)!r}), strategy="fsdp"))
    """)
    env = {**os.environ, "FSDP_VERSION": "2"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    shard = save / "ep0-ba3"
    assert (shard / ".metadata").is_file()
    summary = export_checkpoint(save / "latest-rank0.pt", tmp_path / "hf")
    assert summary.checkpoint_kind == "composer_sharded"
    dcp_to_torch_save(shard, tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=False)["state"]["model"]
    exported = DDSCModel.from_pretrained(tmp_path / "hf").dit.state_dict()
    assert set(exported) == {k.removeprefix("model.") for k in full}
    for key, value in full.items():
        assert torch.equal(exported[key.removeprefix("model.")], value), key


@pytest.mark.slow
def test_deepspeed_zero_checkpoint_export(data, tmp_path):
    """A DeepSpeed ZeRO-2 engine on CPU (gloo, one rank) takes a step and saves; export == engine weights."""
    script = textwrap.dedent(f"""
        import os
        os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0",
                          LOCAL_RANK="0", WORLD_SIZE="1")
        import deepspeed, torch
        from safetensors.torch import save_file
        from ddsc.train.run import resolve_run
        from pathlib import Path
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_hf_export import run_config, a_batch
        from ddsc.train.composer_model import DDSCComposerModel
        config = resolve_run(run_config(Path({str(data)!r}), Path({str(tmp_path / "ds")!r}))).config
        model = DDSCComposerModel(config.model, config.diffusion)
        deepspeed.init_distributed(dist_backend="gloo")
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={{
            "train_micro_batch_size_per_gpu": 6, "zero_optimization": {{"stage": 2}},
            "optimizer": {{"type": "AdamW", "params": {{"lr": 0.01, "torch_adam": True}}}}}})
        loss = engine(a_batch(Path({str(data)!r}))).loss
        engine.backward(loss)
        engine.step()
        engine.save_checkpoint({str(tmp_path / "ds")!r}, tag="step1")
        save_file({{k: v.contiguous() for k, v in engine.module.model.state_dict().items()}},
                  {str(tmp_path / "reference.safetensors")!r})
    """)
    (tmp_path / "ds").mkdir()  # the run config is written beside the checkpoint, as a trainer does
    from ddsc.config import save_config
    from ddsc.train.run import resolve_run

    save_config(resolve_run(run_config(data, tmp_path / "ds")).config, tmp_path / "ds" / "config.yaml")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file

    reference = load_file(tmp_path / "reference.safetensors")
    for path in (tmp_path / "ds", tmp_path / "ds" / "step1"):  # the save folder (with 'latest') or one tag
        summary = export_checkpoint(path, tmp_path / "hf")
        assert summary.checkpoint_kind == "deepspeed"
        exported = DDSCModel.from_pretrained(tmp_path / "hf").dit.state_dict()
        assert set(exported) == set(reference)
        for key, value in reference.items():
            assert torch.equal(exported[key], value.float()), key
    assert not torch.equal(reference["head.weight"], torch.zeros_like(reference["head.weight"]))


def test_relative_imports_rewrite():
    source = (
        "import math\nfrom ddsc.model.dit import DiT\n    from ddsc.data.tokens import X, Y\nfrom torch import nn\n"
    )
    assert (
        relative_imports(source)
        == "import math\nfrom .dit import DiT\n    from .tokens import X, Y\nfrom torch import nn\n"
    )
    with pytest.raises(ValueError, match="import ddsc"):
        relative_imports("import ddsc.model.dit\n")
    with pytest.raises(ValueError, match="from ddsc import"):
        relative_imports("from ddsc import DDSCModel\n")
    sources = remote_code_sources()
    assert set(sources) == {"config.py", "dit.py", "conditions.py", "chemistry.py", "tokens.py", "hf.py"}
    assert all("ddsc." not in line for s in sources.values() for line in s.splitlines() if "import" in line)


def test_strip_wrappers_and_bad_checkpoints(tmp_path):
    state = {"module.model._orig_mod.head.weight": 1, "module.model.blocks.0._checkpoint_wrapped_module.x": 2}
    assert strip_wrappers(state) == {"head.weight": 1, "blocks.0.x": 2}
    assert strip_wrappers({"head.weight": 1}) == {"head.weight": 1}
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_model_state(tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a checkpoint"):
        read_model_state(tmp_path / "empty")


def test_export_errors(composer_run, data, tmp_path):
    save, _, _ = composer_run
    checkpoint = save / "latest-rank0.pt"
    with pytest.raises(FileNotFoundError, match="pass --vocab"):
        export_checkpoint(checkpoint, tmp_path / "hf", vocab_path=tmp_path / "missing.json")
    other = run_config(data, save)
    other.model.d_model = 64
    from ddsc.config import save_config

    save_config(other, tmp_path / "config.yaml")
    with pytest.raises(ValueError, match="do not match the run config"):
        export_checkpoint(checkpoint, tmp_path / "hf", config_path=tmp_path / "config.yaml")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()


def test_truncated_checkpoint_and_weights_are_reported_by_name(composer_run, data, tmp_path, capsys):
    """A copy of the checkpoint cut short (a job killed while writing it): named as corrupt, not as a missing
    config; a model.safetensors cut short: one line naming it from every command that loads the model."""
    save, _, _ = composer_run
    copy = tmp_path / "ep0-ba3-rank0.pt"
    full = (save / "latest-rank0.pt").read_bytes()
    copy.write_bytes(full[: len(full) // 2])
    assert cli_main(["export", "--checkpoint", str(copy), "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == (
        f"ddsc export: error: {copy}: corrupt checkpoint: not a complete torch.save zip archive, truncated? "
        "(File is not a zip file)\n"
    )
    assert not (tmp_path / "hf").exists()

    export_checkpoint(save, tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    anndata.AnnData(X=sp.csr_matrix(np.ones((2, 3), np.float32))).write_h5ad(tmp_path / "x.h5ad")
    commands = {
        "embed": ["--input", str(tmp_path / "x.h5ad"), "--output", str(tmp_path / "out.h5ad")],
        "generate": ["--genes", "G1", "--output", str(tmp_path / "out.h5ad")],
        "evaluate": ["--data", str(data), "--out", str(tmp_path / "report")],
    }
    for command, args in commands.items():
        assert cli_main([command, "--model", str(tmp_path / "model"), *args]) == 2
        assert capsys.readouterr().err.startswith(
            f"ddsc {command}: error: {weights}: not a complete safetensors file (Error while deserializing header"
        )


def test_model_exported_by_an_earlier_version_still_loads(tmp_path):
    """``tests/data/export_v0.tar.gz``: a small model with label, molecule and scalar conditions, exported by the
    code at commit f5d17b3 (before the inference package split), with a batch, its encoded conditions and the
    logits that code computed. It must load through ``Predictor`` (same condition encoding, same logits) and
    through ``AutoModel`` with its own shipped modelling code."""
    import tarfile

    from safetensors.torch import load_file
    from transformers import AutoModel

    from ddsc.inference import Predictor

    with tarfile.open(REPO / "tests" / "data" / "export_v0.tar.gz") as archive:
        archive.extractall(tmp_path, filter="data")
    reference = load_file(tmp_path / "reference.safetensors")
    predictor = Predictor.from_pretrained(tmp_path / "model", progress=False)
    values = {
        "cell_line_id": ["L0", "L2", "", "L1"],
        "smiles": ["CCO", "c1ccccc1O", "", "CC(=O)Oc1ccccc1C(=O)O"],
        "dose": ["0.5", "5", "", "0"],
    }
    cond = predictor.encode(values, 4)
    torch.testing.assert_close(cond, reference["cond"], rtol=0, atol=0)
    batch = (reference["gene_ids"], reference["expr"], reference["attention_mask"], reference["cond"])
    remote = AutoModel.from_pretrained(tmp_path / "model", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(predictor.model(*batch), reference["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(remote(*batch), reference["logits"], rtol=1e-5, atol=1e-5)
    assert type(remote).__module__ != "ddsc.model.hf"  # the folder's own code, not the installed package's
