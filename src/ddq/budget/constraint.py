"""The budget as a constraint with an adapted weight (a Lagrange multiplier)."""

from __future__ import annotations

import torch

from .budget import Budget
from .cost import CostModel

__all__ = ["BudgetConstraint"]


class BudgetConstraint:
    """``loss + lambda * (cost / target - 1)`` with ``lambda`` raised by dual ascent.

    While the model is over budget, ``lambda`` grows by ``step * (cost / target - 1)`` each
    update; under budget it shrinks (never below 0), so the task gradient can reopen bits:
    bits move both ways. The term's gradient on a gate is ``lambda / target`` times what
    that bit costs.

    Annealing: ``set_progress(p)`` moves the effective target linearly from the model's
    initial cost (``p = 0``) to the budget (``p >= 1``). A target that moves gradually lets
    ``lambda`` track it, so bits leave the layers that need them least one at a time;
    facing the final target at once, every gate is pushed down together and the
    bitwidths overshoot far below the budget before ``lambda`` can react.

    Example:
        >>> c = BudgetConstraint(Budget(avg_weight_bits=4), CostModel(model))  # doctest: +SKIP
        >>> loss = task_loss + c.penalty(); loss.backward(); c.update()
    """

    def __init__(self, budget: Budget, cost_model: CostModel, step: float = 0.02) -> None:
        self.budget = budget
        self.cost_model = cost_model
        self.step = step
        self.lam = 0.0
        self._target = budget.target(cost_model)
        self._start = max(float(budget.measure(cost_model).detach()), self._target)
        self.progress = 1.0

    def set_progress(self, p: float) -> None:
        """Anneal the effective target (see the class docstring)."""
        self.progress = min(max(p, 0.0), 1.0)

    @property
    def target(self) -> float:
        """The effective target now."""
        return self._target + (self._start - self._target) * (1.0 - self.progress)

    def excess(self) -> torch.Tensor:
        """``cost / target - 1`` (differentiable); positive means over budget."""
        return self.budget.measure(self.cost_model) / self.target - 1

    def penalty(self) -> torch.Tensor:
        return self.lam * self.excess()

    def update(self) -> float:
        """One dual-ascent step on ``lambda``; returns the excess used."""
        ex = float(self.excess().detach())
        self.lam = max(0.0, self.lam + self.step * ex)
        return ex

    def state_dict(self) -> dict[str, float]:
        return {"lam": self.lam, "step": self.step, "start": self._start}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.lam, self.step, self._start = float(d["lam"]), float(d["step"]), float(d["start"])
