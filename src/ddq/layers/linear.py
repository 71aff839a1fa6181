"""Quantized ``Linear``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import QuantLayer

__all__ = ["QuantLinear"]


class QuantLinear(QuantLayer, nn.Linear):
    """``nn.Linear`` whose weight and input pass through DDQ quantizers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)
