"""Quantized ``Conv1d`` and ``Conv2d`` (grouped and depthwise included)."""

from __future__ import annotations

import torch
from torch import nn

from .base import QuantLayer

__all__ = ["QuantConv1d", "QuantConv2d"]


class QuantConv1d(QuantLayer, nn.Conv1d):
    """``nn.Conv1d`` whose weight and input pass through DDQ quantizers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` whose weight and input pass through DDQ quantizers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)
