"""The ``ddsc`` console entry point.

Each subcommand lives in the module that implements it and registers itself through ``add_parser``; this
file only wires them together, importing heavy modules lazily so ``ddsc --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module with ``add_arguments(parser)`` and ``run(args)``; first docstring line is the help.
COMMANDS: dict[str, str] = {
    "config": "ddsc.commands.config",
    "check-data": "ddsc.commands.check_data",
    "export": "ddsc.commands.export",
    "impute": "ddsc.commands.impute",
    "generate": "ddsc.commands.generate",
    "embed": "ddsc.commands.embed",
    "evaluate": "ddsc.commands.evaluate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddsc", description="DDSC: masked discrete diffusion for single cells.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip().splitlines()
        summary = doc[0] if doc else ""
        command = sub.add_parser(name, help=summary, description=(module.__doc__ or "").strip())
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a problem with its input ends it with ``ddsc <command>: error: ...`` and status 2."""
    from ddsc.errors import run_reporting_errors

    args = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: args._run(args), prefix=f"ddsc {args.command}: error", status=2)


if __name__ == "__main__":
    sys.exit(main())
