"""Validate a training YAML (+ key=value overrides) and print the exact resolved config.

Runs the same strict schema as ``composer launch/train.py`` without starting anything, so a typo is
caught before a job is queued on a cluster.
"""

from __future__ import annotations

import argparse

import yaml

from ddsc.config import load_config, to_dict
from ddsc.train.config import RunConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("yaml", help="training config, e.g. yamls/dit_1024.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.n_layers=24")


def run(args: argparse.Namespace) -> int:
    config = load_config(RunConfig, args.yaml, args.overrides)
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0
