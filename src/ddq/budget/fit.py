"""Guarantee the budget: close (or reopen) gates by first-order loss change per bit."""

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
) -> list[FitAction]:
    """Make the model meet ``budget`` exactly (at or under), moving as few bits as needed.

    While over budget, close the last open bit of the learnable quantizer whose estimated
    loss increase per unit of budget saved is smallest; the estimate is first order:
    closing bit ``b`` changes the loss by about ``-dL/dg_b``, with ``dL/dg`` the task-loss
    gate gradients the caller accumulated over a few batches (``gate_grads``, by
    quantizer name; the straight-through gate-logit gradients are exactly these). With
    ``fill=True``, slack left under the budget is then spent on reopening the bits with the
    largest estimated loss decrease per unit cost that still fit. ``target`` replaces the
    budget's own target (the training loop passes its annealed target while tracking).

    Returns:
        The bits moved, in order (empty when the model already fits and nothing fills).
    """
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
            if best is None or score < best[0]:
                best = (score, name, q, b, cost)
        if best is None:
            raise RuntimeError("over budget with no bit left to close (feasibility was checked)")
        _, name, q, b, cost = best
        q.set_bits(b - 1, trainable=True)
        actions.append(FitAction(name, b, b - 1, -_gate_grad(gate_grads, name, b), -cost))

    while fill:
        slack = target - measure()
        best = None
        for name, q in qs.items():
            b = q.bits
            cost = budget.unit_cost(cost_model, name, q)
            if b >= int(q.ceiling) or cost <= 0 or cost > slack:
                continue
            gain = -_gate_grad(gate_grads, name, b + 1)  # loss decrease of opening
            if gain > 0 and (best is None or gain / cost > best[0]):
                best = (gain / cost, name, q, b, cost)
        if best is None:
            break
        _, name, q, b, cost = best
        q.set_bits(b + 1, trainable=True)
        if measure() > target * (1 + 1e-9):  # cost estimate was off: undo and stop
            q.set_bits(b, trainable=True)
            break
        actions.append(FitAction(name, b, b + 1, _gate_grad(gate_grads, name, b + 1), cost))
    return actions
