"""The ``ddq`` command line: quantize, eval, report, export, list."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import eval_cmd, export_cmd, quantize_cmd

__all__ = ["main"]


def _run_list(args: argparse.Namespace) -> int:
    from ..data import list_datasets
    from ..models import list_models

    print("models:  ", ", ".join(list_models()))
    print("datasets:", ", ".join(list_datasets()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddq",
        description="Differentiable Dynamic Quantization: learn per-layer bits, ranges and "
        "levels under a size or BitOps budget.",
    )
    parser.add_argument("--version", action="version", version=f"ddq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    quantize_cmd.add_parser(sub)
    eval_cmd.add_parsers(sub)
    export_cmd.add_parser(sub)
    lst = sub.add_parser("list", help="list registered models and datasets")
    lst.set_defaults(func=_run_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ddq`` command. Errors print one clear line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"ddq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
