"""Run reports: per-layer tables, totals against budget and FP32, and plots."""

from .report import write_report
from .tables import layer_rows, totals

__all__ = ["layer_rows", "totals", "write_report"]
