"""Train DDSC: ``composer launch/train.py yamls/<name>.yaml [key=value ...]``.

The YAML and overrides are validated (strict schema, data paths, label vocabulary) before torch.distributed
is initialised, so a typo stops every rank at once with the key named instead of failing inside a job.
Also runs as ``torchrun launch/train.py ...`` or ``python launch/train.py ...`` (one process).
A problem with the input (config, data, checkpoints) ends the run with one line ``error: ...`` and exit
status 2 (``DDSC_DEBUG=1`` shows the traceback).
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

    from ddsc.config import load_config
    from ddsc.errors import run_reporting_errors
    from ddsc.train.config import RunConfig

    def run() -> int:
        config = load_config(RunConfig, args.yaml, args.overrides)
        from ddsc.train.trainer import check_data, train

        check_data(config)
        summary = train(config)  # checks what needs the process group (remote vocabularies) first
        if os.environ.get("RANK", "0") == "0":
            print(summary.format())
        return 0

    return run_reporting_errors(run, status=2)


if __name__ == "__main__":
    sys.exit(main())
