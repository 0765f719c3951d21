"""Train DDSC: ``composer launch/train.py yamls/<name>.yaml [key=value ...]``.

The YAML and overrides are validated (strict schema, data paths, label vocabulary) before torch.distributed
is initialised, so a typo stops every rank at once with the key named instead of failing inside a job.
Also runs as ``torchrun launch/train.py ...`` or ``python launch/train.py ...`` (one process).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("yaml", help="training config, e.g. yamls/dit_1024.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_duration=10ba")
    args = parser.parse_args(argv)

    from ddsc.config import ConfigError, load_config
    from ddsc.train.config import RunConfig

    try:
        config = load_config(RunConfig, args.yaml, args.overrides)
        from ddsc.train.trainer import check_data, train

        check_data(config)
        summary = train(config)  # checks what needs the process group (remote vocabularies) before training
    except ConfigError as err:
        print(f"launch/train.py: config error: {err}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
