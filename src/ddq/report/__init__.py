"""Run reports: per-layer tables, totals against budget and FP32, level quality, and plots."""

from .level_quality import level_quality, summarize_level_quality
from .report import write_report
from .tables import layer_rows, totals

__all__ = ["layer_rows", "level_quality", "summarize_level_quality", "totals", "write_report"]
