"""The ``melora`` command: parses arguments, then calls the runner of the chosen subcommand.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which registers
the subparser and sets ``func`` (called with the parsed namespace).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMAND_MODULES = (
    "melora.finetune.glue",
    "melora.finetune.instruct",
    "melora.eval.runner",
    "melora.bench.runner",
    "melora.report",
    "melora.export",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="melora", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        module = importlib.import_module(name)
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
