"""``ddq eval`` and ``ddq report``: re-evaluate or re-report a finished run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_parsers", "run_splits"]


def add_parsers(sub: Any) -> None:
    e = sub.add_parser("eval", help="evaluate a finished run's quantized model on its test data")
    e.add_argument("run_dir", help="run folder written by `ddq quantize`")
    e.add_argument("--data-root", help="override the dataset folder")
    e.set_defaults(func=run_eval)
    r = sub.add_parser("report", help="rewrite a finished run's report and plots")
    r.add_argument("run_dir", help="run folder written by `ddq quantize`")
    r.set_defaults(func=run_report)


def run_splits(run_dir: str | Path, data_root: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The data splits a finished run was trained and tested on, and its saved config."""
    from ..data import create_dataset
    from ..jobs.run import RUN_CONFIG_FILE

    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a run folder written by `ddq quantize`")
    cfg = json.loads(path.read_text())
    splits = create_dataset(cfg["dataset"], root=data_root or cfg["data_root"],
                            subset=cfg["subset"], seed=cfg["seed"])  # fmt: skip
    return splits, cfg


def run_eval(args: argparse.Namespace) -> int:
    from ..data import make_loaders
    from ..jobs.run import load_run
    from ..training.loop import evaluate

    model, _ = load_run(args.run_dir)
    splits, cfg = run_splits(args.run_dir, args.data_root)
    _, test_loader = make_loaders(splits, cfg["batch_size"], seed=cfg["seed"])
    acc = evaluate(model, test_loader)
    print(f"{args.run_dir}: test accuracy {acc:.2f}% ({len(splits.test)} examples)")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from ..jobs.run import RESULT_FILE, load_run
    from ..report import write_report

    run_dir = Path(args.run_dir)
    model, _ = load_run(run_dir)
    result_path = run_dir / RESULT_FILE
    if not result_path.is_file():
        raise FileNotFoundError(f"{result_path} not found: the run did not finish")
    result = json.loads(result_path.read_text())
    history = json.loads((run_dir / "report.json").read_text()).get("history", []) if (
        run_dir / "report.json").is_file() else []  # fmt: skip
    write_report(run_dir, model, result, history)
    print(f"wrote {run_dir / 'report.md'}")
    return 0
