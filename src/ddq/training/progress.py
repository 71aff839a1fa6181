"""Progress bars and the per-epoch CSV log (TensorBoard too when it is installed)."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "progress"]


def progress(iterable: Iterable[Any], enabled: bool, **kw: Any) -> Any:
    """A tqdm bar when enabled (and tqdm is installed), else the iterable itself."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional dependency of the core
        return iterable
    return tqdm(iterable, dynamic_ncols=True, leave=False, **kw)


class MetricsLog:
    """Appends one row per epoch to ``history.csv`` (rewritten whole, so resumes stay clean)."""

    def __init__(self, run_dir: Path | None, rows: list[dict[str, Any]] | None = None) -> None:
        self.run_dir = run_dir
        self.rows: list[dict[str, Any]] = list(rows or [])
        self._tb = None
        if run_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception:  # tensorboard not installed: the CSV is the log
                self._tb = None

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.run_dir is None:
            return
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(self.run_dir / "history.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, int | float) and k != "epoch":
                    self._tb.add_scalar(k, v, row["epoch"])
            self._tb.flush()
