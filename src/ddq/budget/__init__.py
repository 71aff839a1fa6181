"""Budgets: cost models, the constraint used in training, and the final guarantee."""

from .budget import Budget, learnable_quantizers
from .constraint import BudgetConstraint
from .cost import CostModel, LayerCost
from .fit import FitAction, fit_to_budget
from .track import BudgetTracker

__all__ = [
    "Budget",
    "BudgetConstraint",
    "BudgetTracker",
    "CostModel",
    "FitAction",
    "LayerCost",
    "fit_to_budget",
    "learnable_quantizers",
]
