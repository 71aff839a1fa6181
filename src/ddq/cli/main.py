"""The ``ddq`` command line: quantize, eval, report, export, list."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

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


class _ConsoleHandler(logging.Handler):
    """The library's log records as plain lines: INFO to stdout, WARNING and above to
    stderr. The stream is looked up for every record, so a redirected or captured
    ``sys.stdout`` is honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


@contextmanager
def _console_logging() -> Iterator[None]:
    """Show the ``ddq`` logger's INFO lines (per-epoch progress) while a command runs.

    Only the ``ddq`` logger is configured (the root logger is left alone), and its
    previous settings are restored afterwards, so calling ``main`` from Python leaves no
    handler behind.
    """
    logger = logging.getLogger("ddq")
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # shown once, here, even if the root logger has handlers
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ddq`` command. Errors print one clear line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        with _console_logging():
            return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"ddq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
