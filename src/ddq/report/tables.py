"""The numbers of a report: per-layer rows and model totals against budget and FP32."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..budget import Budget, CostModel
from ..conversion import state_of, summary

__all__ = ["layer_rows", "totals"]


def layer_rows(model: nn.Module, budget: Budget | None = None) -> list[dict[str, Any]]:
    """``ddq.summary`` rows plus level counts and each layer's share of the budget.

    The share is the layer's part of the budgeted quantity: ``n_w b_w`` of the weight bits
    for size budgets, ``MACs b_w b_a`` for BitOps budgets.
    """
    rows = [dict(r) for r in summary(model)]
    by_bitops = budget is not None and budget.kind == "gbitops"
    parts = [
        (r["macs"] or 0) * r["w_bits"] * r["a_bits"]
        if by_bitops
        else r["weight_elements"] * r["w_bits"]
        for r in rows
    ]
    total = sum(parts) or 1
    for r, part in zip(rows, parts, strict=True):
        r["w_levels"] = 2 ** r["w_bits"] if r["mode"] != "float" else None
        r["budget_share"] = part / total
    return rows


def totals(model: nn.Module, budget: Budget | None = None) -> dict[str, Any]:
    """Achieved size / BitOps / average bits, the FP32 reference, and the budget target."""
    cm = CostModel(model)
    out: dict[str, Any] = {
        "size_bytes": cm.size_bytes(),
        "fp32_bytes": cm.fp32_bytes(),
        "size_ratio_vs_fp32": cm.size_bytes() / cm.fp32_bytes(),
        "gbitops": cm.gbitops(),
        "fp32_gbitops": cm.fp32_gbitops(),
        "avg_weight_bits": cm.avg_weight_bits(),
        "avg_act_bits": cm.avg_act_bits(),
        "conventions": state_of(model).conventions(),
    }
    if budget is not None:
        out.update(
            budget=budget.to_dict(),
            budget_description=budget.describe(),
            budget_target=budget.target(cm),
            budget_measured=float(budget.measure(cm).detach()),
            budget_usage=budget.usage(cm),
            budget_met=budget.usage(cm) <= 1 + 1e-9,
        )
    return out
