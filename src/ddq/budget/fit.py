"""Guarantee the budget: close the bits training pushed lowest, reopen the most useful."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .budget import Budget, learnable_quantizers
from .cost import CostModel

__all__ = ["FitAction", "fit_to_budget"]


@dataclass
class FitAction:
    """One bit closed or opened by ``fit_to_budget``."""

    quantizer: str
    from_bits: int
    to_bits: int
    est_loss_change: float
    cost_change: float


def _gate_grad(grads: dict[str, torch.Tensor], name: str, bit: int) -> float:
    """dL/dg for bit number ``bit`` (1-based) of quantizer ``name``."""
    g = grads.get(name)
    return 0.0 if g is None else float(g[bit - 1])


@torch.no_grad()
def fit_to_budget(
    model: nn.Module,
    budget: Budget,
    cost_model: CostModel,
    gate_grads: dict[str, torch.Tensor],
    fill: bool = True,
    target: float | None = None,
    close_by: str = "logit",
) -> list[FitAction]:
    """Make the model meet ``budget`` exactly (at or under), moving as few bits as needed.

    While over budget, close one bit at a time. ``close_by="logit"`` (default) closes the
    last open bit whose gate logit is lowest: the bit that training itself has pushed
    closest to closing (the logits integrate the task and budget gradients over every
    step so far; ties are broken as below). ``close_by="gradient"`` closes the bit whose
    estimated loss increase per unit of budget saved is smallest, to first order: closing
    bit ``b`` changes the loss by about ``-dL/dg_b``, with ``dL/dg`` the task-loss gate
    gradients the caller accumulated over a few batches (``gate_grads``, by quantizer
    name; the straight-through gate-logit gradients are exactly these). On MobileNetV2 at
    a 3-bit size the gradient ranking, moving ~80 bits at once, broke the model (11%
    accuracy) where the logit ranking kept it (see BENCHMARKS.md). With
    ``fill=True`` the slack left under the budget is then spent: the closed bit that
    training pushed least (the highest gate logit; ties by estimated loss decrease per
    unit cost) is reopened, one at a time, until no closed bit fits in what is left, so a
    run ends using its budget rather than wherever the closing stopped. ``target``
    replaces the budget's own target (the training loop passes its annealed target while
    tracking).

    Returns:
        The bits moved, in order (empty when the model already fits and nothing fills).
    """
    if close_by not in ("logit", "gradient"):
        raise ValueError(f"close_by must be 'logit' or 'gradient', got {close_by!r}")
    qs = learnable_quantizers(model)
    target = budget.target(cost_model) if target is None else target
    actions: list[FitAction] = []

    def measure() -> float:
        return float(budget.measure(cost_model))

    while measure() > target * (1 + 1e-9):
        best = None
        for name, q in qs.items():
            b = q.bits
            cost = budget.unit_cost(cost_model, name, q)
            if b <= int(q.floor) or cost <= 0:
                continue
            score = -_gate_grad(gate_grads, name, b) / cost
            if close_by == "logit":
                score = (float(q.gate_logits[b - 1]), score)
            if best is None or score < best[0]:
                best = (score, name, q, b, cost)
        if best is None:
            raise RuntimeError("over budget with no bit left to close (feasibility was checked)")
        _, name, q, b, cost = best
        q.set_bits(b - 1, trainable=True)
        actions.append(FitAction(name, b, b - 1, -_gate_grad(gate_grads, name, b), -cost))

    full: set[str] = set()  # quantizers whose next bit turned out not to fit
    while fill:
        slack = target - measure()
        best = None
        for name, q in qs.items():
            b = q.bits
            cost = budget.unit_cost(cost_model, name, q)
            if name in full or b >= int(q.ceiling) or cost <= 0 or cost > slack:
                continue
            gain = -_gate_grad(gate_grads, name, b + 1)  # loss decrease of opening
            score = (float(q.gate_logits[b]), gain / cost)
            if best is None or score > best[0]:
                best = (score, name, q, b, cost)
        if best is None:
            break
        _, name, q, b, cost = best
        q.set_bits(b + 1, trainable=True)
        if measure() > target * (1 + 1e-9):  # cost estimate was off: undo, try the others
            q.set_bits(b, trainable=True)
            full.add(name)
            continue
        actions.append(FitAction(name, b, b + 1, _gate_grad(gate_grads, name, b + 1), cost))
    return actions
