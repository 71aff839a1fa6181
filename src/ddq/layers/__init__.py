"""Quantized layers: float layers plus a weight and an input-activation DDQ quantizer."""

from torch import nn

from .base import QuantLayer, quantizers_of
from .conv import QuantConv1d, QuantConv2d
from .linear import QuantLinear

#: Float layer type -> its quantized counterpart (exact types: a subclass may bypass
#: ``forward``, as ``nn.MultiheadAttention``'s output projection does).
QUANT_LAYERS: dict[type[nn.Module], type[QuantLayer]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
}

__all__ = [
    "QUANT_LAYERS",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "quantizers_of",
]
