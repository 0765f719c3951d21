"""The strict config loader: typos, wrong types and missing values fail with the key named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddsc.cli import main
from ddsc.config import ConfigError, load_config, save_config, to_dict
from ddsc.train.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
PROD = ROOT / "yamls" / "dit_1024.yaml"


def test_production_yaml_loads_with_interpolation_and_override():
    cfg = load_config(RunConfig, PROD, ["model.n_layers=24", "optimizer.lr=1e-4", "trainer.max_duration=10ba"])
    assert cfg.model.n_layers == 24
    assert cfg.optimizer.lr == pytest.approx(1e-4)
    assert cfg.trainer.max_duration == "10ba"
    assert cfg.model.num_bins == cfg.data.binning.num_bins == 51  # resolved ${data.binning.num_bins}
    assert [c.name for c in cfg.model.conditions] == ["cell_line_id", "drug", "dose"]
    assert cfg.data.streams["tahoe"].local == "/tmp/ddsc-cache/tahoe"


def test_typo_names_key_and_suggests_closest():
    with pytest.raises(ConfigError, match=r"'model\.n_layer'.*did you mean 'n_layers'"):
        load_config(RunConfig, PROD, ["model.n_layer=3"])


def test_typo_in_section_name():
    with pytest.raises(ConfigError, match=r"unknown config key 'optimiser'.*did you mean 'optimizer'"):
        load_config(RunConfig, PROD, ["optimiser.lr=1"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"model\.n_layers: expected int, got str 'twelve'"):
        load_config(RunConfig, PROD, ["model.n_layers=twelve"])
    with pytest.raises(ConfigError, match=r"trainer\.autoresume: expected bool"):
        load_config(RunConfig, PROD, ["trainer.autoresume=3"])


def test_bad_literal_suggests_choice():
    with pytest.raises(ConfigError, match=r"diffusion\.schedule: 'cosin' is not one of .*did you mean 'cosine'"):
        load_config(RunConfig, PROD, ["diffusion.schedule=cosin"])


def test_missing_required_value(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("model: {n_layers: 2, n_heads: 2, d_model: 8}\n")
    with pytest.raises(ConfigError, match=r"missing required config value 'data'"):
        load_config(RunConfig, path)
    with pytest.raises(ConfigError, match=r"missing required config value 'model\.conditions\[0\]\.name'"):
        load_config(RunConfig, PROD, ["model.conditions=[{dropout: 0.1}]"])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match=r"model\.num_bins=10 must equal data\.binning\.num_bins=51"):
        load_config(RunConfig, PROD, ["model.num_bins=10"])
    with pytest.raises(ConfigError, match=r"model\.n_heads: d_model=768 is not divisible by n_heads=5"):
        load_config(RunConfig, PROD, ["model.n_heads=5"])


def test_float_accepts_int_and_sci_notation_but_not_bool():
    cfg = load_config(RunConfig, PROD, ["optimizer.lr=1", "diffusion.eps=2e-3"])
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.diffusion.eps == pytest.approx(2e-3)
    with pytest.raises(ConfigError, match=r"optimizer\.lr"):
        load_config(RunConfig, PROD, ["optimizer.lr=true"])


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(RunConfig, PROD, ["model.n_layers=3", "trainer.ema_decay=0.999"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(RunConfig, tmp_path / "resolved.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert again == cfg


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'model\.n_layers' must look like key=value"):
        load_config(RunConfig, PROD, ["model.n_layers"])
    with pytest.raises(ConfigError, match=r"config file not found"):
        load_config(RunConfig, tmp_path / "nope.yaml")


def test_cli_reports_typo_with_exit_code_2(capsys):
    assert main(["config", str(PROD), "model.n_layer=3"]) == 2
    err = capsys.readouterr().err
    assert "n_layer" in err and "did you mean 'n_layers'" in err
    assert main(["config", str(PROD), "model.n_layers=3"]) == 0
    assert "n_layers: 3" in capsys.readouterr().out


def test_yaml_syntax_error_is_one_line_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: [1, 2\n")
    message = f"{bad}: line 3, column 1: YAML syntax error: did not find expected ',' or ']'"
    assert main(["config", str(bad)]) == 2
    assert capsys.readouterr().err == f"ddsc config: error: {message}\n"
    env = {k: v for k, v in os.environ.items() if k != "DDSC_DEBUG"}
    launch = [sys.executable, str(ROOT / "launch" / "train.py"), str(bad)]
    done = subprocess.run(launch, capture_output=True, text=True, env=env)
    assert (done.returncode, done.stderr) == (2, f"error: {message}\n")
    debug = subprocess.run(launch, capture_output=True, text=True, env={**env, "DDSC_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr  # the traceback, on request


@pytest.mark.parametrize("path", sorted((ROOT / "yamls").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(RunConfig, path)
    assert cfg.model.num_bins == cfg.data.binning.num_bins


def test_base_yaml_is_overridden_by_the_derived_file():
    large = load_config(RunConfig, ROOT / "yamls" / "dit_1024_large.yaml")
    prod = load_config(RunConfig, PROD)
    assert (large.model.d_model, large.model.n_layers, large.model.n_heads) == (1024, 24, 16)
    assert large.data == prod.data and large.diffusion == prod.diffusion  # inherited unchanged
    assert large.optimizer.lr == pytest.approx(2e-4) and large.optimizer.betas == prod.optimizer.betas


def test_base_chain_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"loops back"):
        load_config(RunConfig, tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*missing\.yaml"):
        load_config(RunConfig, tmp_path / "c.yaml")


def test_a_run_saved_before_a_key_existed_resumes_and_a_changed_frozen_key_does_not():
    from ddsc.train.run_folder import check_compatible

    config = load_config(RunConfig, PROD)
    saved = to_dict(config)
    del saved["model"]["attention"]  # an older run's config.yaml: written before model.attention existed
    check_compatible(saved, config)  # compares as the default ("unpadded"): the run resumes
    saved["model"]["attention"] = "masked"
    with pytest.raises(ConfigError, match="'model.attention' was 'masked' in the saved run but is 'unpadded' now"):
        check_compatible(saved, config)
    del saved["model"]["attention"]
    saved["model"]["retired_option"] = 3  # a key removed since
    with pytest.raises(
        ConfigError, match="saved run's config.yaml does not fit this version: .*'model.retired_option'"
    ):
        check_compatible(saved, config)
