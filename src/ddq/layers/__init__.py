"""Quantized layers: float layers plus a weight and an input-activation DDQ quantizer."""

from torch import nn

from .base import QuantLayer, quantizers_of
from .conv import QuantConv1d, QuantConv2d
from .kinds import LAYER_KINDS, LayerKind, is_depthwise, kind_named, kind_of, role_of
from .linear import QuantLinear

#: Float layer type -> its quantized counterpart, from :data:`LAYER_KINDS` (exact types: a
#: subclass may bypass ``forward``, as ``nn.MultiheadAttention``'s output projection does).
QUANT_LAYERS: dict[type[nn.Module], type[QuantLayer]] = {
    k.float_type: k.quant_type for k in LAYER_KINDS
}

__all__ = [
    "LAYER_KINDS",
    "QUANT_LAYERS",
    "LayerKind",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "is_depthwise",
    "kind_named",
    "kind_of",
    "quantizers_of",
    "role_of",
]

# Registers the attention rewrites (nn.MultiheadAttention, torchvision Swin) and the
# rewrite of transformers' Conv1D (GPT-2) into nn.Linear (transformers is not imported);
# imported last because they use the names above.
from . import attention, hf_conv1d  # noqa: E402, F401
