"""The DeepSpeed engine: same trajectory as the Composer engine, 2-rank ZeRO-3 checkpoint + resume (past a corrupt
checkpoint), re-run of a finished run, export."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_train import tiny_config
from test_train_distributed import torchrun
from train_data import SMALL_VAE, latent_overrides, small_latent_dit, write_mds

from ddsc.cli import main as cli_main
from ddsc.config import ConfigError, load_config
from ddsc.model.hf import DDSCModel
from ddsc.train.checkpoints import read_model_state
from ddsc.train.config import RunConfig
from ddsc.train.deepspeed_engine import DeepSpeedPrecision, check_deepspeed, deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = ["parallelism.engine=deepspeed", "trainer.max_duration=8ba", "trainer.eval_interval=8ba"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ds")
    write_mds(tmp / "mds")
    return tiny_config(tmp)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys() and len(a) > 10
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_zero1_one_rank_matches_composer_engine(tiny, tmp_path):
    """Same init, data, noise, LR curve (warmup + cosine), clipping and microbatching: the same weights.

    Not bitwise: with gradient clipping active the global norm is summed in another order (DeepSpeed: over flat
    buffers; torch: per-tensor norms), so the clip coefficient differs in its last bits. Without clipping the
    two engines agree bitwise (checked by hand: max |diff| = 0); with it, measured 1.8e-6 after 8 batches.
    """
    fp32 = "trainer.precision=fp32"  # bf16 differs by design: autocast in Composer, bf16 weights in ZeRO
    composer = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), str(tiny), f"trainer.save_folder={tmp_path / 'c'}",
         "trainer.max_duration=8ba", fp32],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},  # as torchrun: same kernels
    )  # fmt: skip
    assert composer.returncode == 0, composer.stderr[-3000:]
    torchrun(
        tiny, 29741, *DEEPSPEED, "parallelism.zero_stage=1", fp32, f"trainer.save_folder={tmp_path / 'd'}", nproc=1
    )
    ours, reference = read_model_state(tmp_path / "d"), read_model_state(tmp_path / "c" / "ep0-ba8-rank0.pt")
    assert ours.keys() == reference.keys()
    gap = max((ours[k] - reference[k]).abs().max().item() for k in ours)
    halfway = read_model_state(tmp_path / "d" / "ba4")
    moved = max((ours[k] - halfway[k]).abs().max().item() for k in ours)
    assert gap < 1e-5 and moved > 1e-3  # batches 5-8 move weights by >1e-3; the engines differ by <1e-5


@pytest.mark.slow
def test_zero3_two_ranks_checkpoint_resume_and_export(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    args = [*DEEPSPEED, "parallelism.zero_stage=3", "trainer.save_num_checkpoints_to_keep=2"]
    done = torchrun(tiny, 29742, *args, "trainer.save_interval=2ba", f"trainer.save_folder={run}")
    assert sorted(p.name for p in run.glob("ba*")) == ["ba6", "ba8"]  # keep-last-2 removed ba2 and ba4
    assert sorted(p.name for p in (run / "ba8").glob("*optim_states.pt")) == [
        f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)
    ]  # each rank saved its own ZeRO-3 partition, of a bf16 module (amp_bf16: DeepSpeed's bf16 section)
    assert done.stdout.count("trained 8 batches (64 cells)") == 1  # the summary, from rank 0 only

    # The newest checkpoint is corrupt (rank 1's partition truncated, as by a job killed while writing it): it
    # is moved aside and the run resumes from batch 6; batches 7-8 replay the same data, noise and LR.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    partition = resumed / "ba8" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    partition.write_bytes(partition.read_bytes()[:1000])
    again = torchrun(tiny, 29743, *args, "trainer.save_interval=2ba", f"trainer.save_folder={resumed}")
    assert (
        f"autoresume: checkpoint {resumed / 'ba8'} is corrupt: {partition.name}: not a complete torch.save zip "
        f"archive" in again.stderr
    )
    assert (resumed / "corrupt" / "ba8" / partition.name).stat().st_size == 1000  # moved aside, not deleted
    assert f"resumed from {resumed / 'ba6'}" in again.stdout and "at batch 6" in again.stdout
    final = read_model_state(run)
    assert _equal(final, read_model_state(resumed))  # bitwise on CPU
    assert not _equal(final, read_model_state(run / "ba6"))

    # Launched again, the finished run says so and writes nothing.
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    done = torchrun(tiny, 29744, *args, "trainer.save_interval=2ba", f"trainer.save_folder={run}")
    assert done.stdout.splitlines()[-1] == "run already complete: 8 batches (64 cells) trained; nothing to do"
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["parallelism"]["zero_stage"] == 3 and saved["model"]["conditions"][0]["num_labels"] == 3

    out = tmp_path / "hf"
    assert cli_main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0  # `ddsc export`
    assert "exported deepspeed checkpoint" in capsys.readouterr().out
    exported = DDSCModel.from_pretrained(out).dit.state_dict()
    assert _equal(exported, final)


def test_deepspeed_config_and_early_errors(tiny):
    config = load_config(RunConfig, tiny, ["parallelism.engine=deepspeed", "parallelism.zero_stage=3"])
    ds = deepspeed_config(config, world_size=2, precision=DeepSpeedPrecision())
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        8,
        4,
        1,
    )
    assert ds["zero_optimization"] == {"stage": 3} and ds["gradient_clipping"] == 1.0
    offload = load_config(RunConfig, tiny, ["parallelism.engine=deepspeed", "parallelism.offload_optimizer=true"])
    assert (
        deepspeed_config(offload, world_size=1, precision=DeepSpeedPrecision())["zero_optimization"][
            "offload_optimizer"
        ]["device"]
        == "cpu"
    )
    bad = {
        "parallelism.offload_params=true": "offload_params: needs zero_stage 3",
        "trainer.max_duration=2ep": "trainer.max_duration: the deepspeed engine needs a duration in batches",
        "trainer.save_folder=s3://bucket/run": "trainer.save_folder: the deepspeed engine writes to a filesystem",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            check_deepspeed(load_config(RunConfig, tiny, ["parallelism.engine=deepspeed", override]))
    with pytest.raises(ConfigError, match="device_train_microbatch_size=3 must divide the per-rank batch 8"):
        deepspeed_config(
            load_config(RunConfig, tiny, ["trainer.device_train_microbatch_size=3"]), 1, DeepSpeedPrecision()
        )


@pytest.mark.slow
def test_latent_family_under_zero2_resumes_and_exports(tmp_path):
    """Both latent stages on 2 ZeRO-2 ranks with DeepSpeed's bf16 section: the DiT stage resumes identically, and
    the export holds the DiT and exactly the VAE weights it trained against: DeepSpeed holds every parameter of
    the module in bf16, the frozen VAE's too, so those are the VAE run's weights rounded to bf16."""
    write_mds(tmp_path / "mds", n_train=64, n_valid=8)
    common = [*latent_overrides(tmp_path / "mds"), *DEEPSPEED, "parallelism.zero_stage=2"]
    common += ["trainer.precision=amp_bf16", "trainer.save_interval=4ba"]
    vae, dit = tmp_path / "vae", tmp_path / "dit"
    torchrun(ROOT / "yamls" / "latent_vae_demo_cpu.yaml", 29745, *common, *SMALL_VAE, f"trainer.save_folder={vae}")
    dit_args = [*common, *small_latent_dit(vae)]
    dit_yaml = ROOT / "yamls" / "latent_dit_demo_cpu.yaml"
    torchrun(dit_yaml, 29746, *dit_args, f"trainer.save_folder={dit}")
    resumed = tmp_path / "resumed"  # the job died after the batch-4 checkpoint
    shutil.copytree(dit, resumed)
    shutil.rmtree(resumed / "ba8")
    (resumed / "latest").write_text("ba4")
    again = torchrun(dit_yaml, 29747, *dit_args, f"trainer.save_folder={resumed}")
    assert f"resumed from {resumed / 'ba4'}" in again.stdout

    final = read_model_state(dit)
    assert _equal(final, read_model_state(resumed))
    trained = [k for k in final if k.startswith("model.")]
    assert trained and not _equal(
        {k: final[k] for k in trained}, {k: read_model_state(dit / "ba4")[k] for k in trained}
    )
    vae_run = read_model_state(vae)
    assert cli_main(["export", "--checkpoint", str(dit), "--out", str(tmp_path / "hf")]) == 0
    from ddsc.inference import Predictor

    exported = Predictor.from_pretrained(tmp_path / "hf", progress=False).model.state_dict()
    assert {k.removeprefix("vae.") for k in exported if k.startswith("vae.")} == set(vae_run)
    for name, tensor in vae_run.items():
        assert torch.equal(exported[f"vae.{name}"], tensor.bfloat16().float()), name
    for name in trained:
        assert torch.equal(exported[f"dit.{name.removeprefix('model.')}"], final[name]), name
