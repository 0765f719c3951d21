"""2-rank FSDP2 on loopback (gloo): sharded checkpoints, and autoresume from one continues identically."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import tiny_config
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from train_data import SMALL_VAE, latent_overrides, small_latent_dit, write_mds

ROOT = Path(__file__).resolve().parents[1]


def torchrun(config: Path, port: int, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={port}",
        str(ROOT / "launch" / "train.py"),
        str(config),
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def consolidated(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    """Gather a sharded (torch.distributed.checkpoint) Composer checkpoint into one state dict."""
    dcp_to_torch_save(checkpoint, out)
    return torch.load(out, map_location="cpu", weights_only=False)["state"]["model"]


def rewound(run: Path, to: Path, keep: str, drop: str) -> Path:
    """A copy of the save folder ``run`` as if the job had died after checkpoint ``keep``: ``drop`` removed and
    ``latest`` pointing at ``keep``."""
    shutil.copytree(run, to, symlinks=True)
    shutil.rmtree(to / drop)
    (to / "latest-rank0.pt").unlink()
    (to / "latest-rank0.pt").symlink_to(keep)
    return to


def resumed_identically(run: Path, resumed: Path, tmp: Path, trained: str = "") -> dict[str, torch.Tensor]:
    """``run``'s batch-8 weights, checked equal to ``resumed``'s and, in the tensors named ``trained...``,
    different from its batch-4 ones (batches 5-8 did change the weights)."""
    expected = consolidated(run / "ep0-ba8", tmp / "a.pt")
    actual = consolidated(resumed / "ep0-ba8", tmp / "b.pt")
    assert expected.keys() == actual.keys() and len(expected) > 10
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name
    first = consolidated(run / "ep0-ba4", tmp / "c.pt")
    names = [k for k in expected if k.startswith(trained)]
    assert names and not all(torch.equal(first[k], expected[k]) for k in names)
    return expected


@pytest.mark.slow
def test_fsdp2_sharded_checkpoint_and_autoresume(tmp_path):
    write_mds(tmp_path / "mds")
    config = tiny_config(tmp_path)
    run = tmp_path / "run"
    cache = tmp_path / "cache"
    args = [
        f"trainer.save_folder={run}",
        "parallelism.strategy=fsdp",
        "trainer.max_duration=8ba",
        "trainer.eval_interval=8ba",
        # Vocabularies by URL, as on a fresh node with the data in object storage: local rank 0 fetches them
        # into the stream's cache while rank 1 waits at the barrier.
        f"data.streams.synth.local={cache}",
        f"data.labels=file://{tmp_path / 'mds' / 'labels.json'}",
        f"data.vocab=file://{tmp_path / 'mds' / 'vocab.json'}",
    ]
    torchrun(config, 29731, *args)
    assert sorted(p.name for p in (run / "ep0-ba8").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    for name in ("labels.json", "vocab.json"):
        assert (cache / name).read_bytes() == (tmp_path / "mds" / name).read_bytes()
    assert not list(cache.glob(".*.partial"))

    # Pretend the job died after the batch-4 checkpoint: drop batch 8 and point `latest` back at batch 4.
    resumed = rewound(run, tmp_path / "resumed", "ep0-ba4", "ep0-ba8")
    torchrun(config, 29732, *[a.replace(str(run), str(resumed)) for a in args])

    resumed_identically(run, resumed, tmp_path)


@pytest.mark.slow
def test_latent_family_under_fsdp2_shards_resumes_and_exports(tmp_path):
    """Both latent stages on 2 FSDP2 ranks: sharded checkpoints of each, the DiT stage resumes from one
    identically, the export of its sharded checkpoint holds exactly the VAE stage's last weights and the DiT's,
    and the periodic export gathered from the live shards is that same model."""
    from ddsc.inference import Predictor
    from ddsc.train.export import export_checkpoint

    write_mds(tmp_path / "mds", n_train=64, n_valid=8)
    common = [*latent_overrides(tmp_path / "mds"), "parallelism.strategy=fsdp", "trainer.max_duration=8ba"]
    common += ["trainer.eval_interval=8ba", "trainer.save_interval=4ba", "trainer.log_to_console=false"]
    vae, dit = tmp_path / "vae", tmp_path / "dit"
    torchrun(ROOT / "yamls" / "latent_vae_demo_cpu.yaml", 29733, *common, *SMALL_VAE, f"trainer.save_folder={vae}")
    assert sorted(p.name for p in (vae / "ep0-ba8").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    dit_args = [*common, *small_latent_dit(vae)]
    dit_args.append("trainer.hf_export_interval=8ba")  # gathered from the shards by every rank, written by rank 0
    dit_yaml = ROOT / "yamls" / "latent_dit_demo_cpu.yaml"
    torchrun(dit_yaml, 29734, *dit_args, f"trainer.save_folder={dit}")
    resumed = rewound(dit, tmp_path / "resumed", "ep0-ba4", "ep0-ba8")  # the job died after the batch-4 checkpoint
    torchrun(dit_yaml, 29735, *dit_args, f"trainer.save_folder={resumed}")

    vae_state = consolidated(vae / "ep0-ba8", tmp_path / "v.pt")
    expected = resumed_identically(dit, resumed, tmp_path, trained="model.")  # the DiT; the VAE is frozen
    export_checkpoint(dit, tmp_path / "hf")
    loaded = Predictor.from_pretrained(tmp_path / "hf", progress=False)
    assert loaded.family == "latent"
    exported = loaded.model.state_dict()
    vae_weights = {k.removeprefix("model."): v for k, v in vae_state.items()}
    assert {k.removeprefix("vae.") for k in exported if k.startswith("vae.")} == set(vae_weights)
    for name, tensor in vae_weights.items():  # the VAE the DiT trained on: the VAE stage's last checkpoint
        assert torch.equal(exported[f"vae.{name}"], tensor), name
    for name, tensor in expected.items():  # and the DiT of the sharded checkpoint
        if name.startswith("model."):
            assert torch.equal(exported[f"dit.{name.removeprefix('model.')}"], tensor), name
    assert float(loaded.model.config.latent_std) == pytest.approx(float(expected["latent_std"]))
    periodic = Predictor.from_pretrained(dit / "hf" / "ba8", progress=False).model.state_dict()
    assert periodic.keys() == exported.keys()
    for name, tensor in periodic.items():
        assert torch.equal(tensor, exported[name]), name
