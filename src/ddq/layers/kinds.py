"""The one table of supported layer kinds.

Every part of ddq that needs to know which layer types it handles reads this table:
``prepare`` (which float types become which quantized types), the MAC count, ``summary``
(a layer's role: linear, depthwise, pointwise or conv), the cost model, freezing into the
artifact, the manifest (its type names and weight ranks) and the deploy runtime (a
``Linear`` or a convolution of ``spatial_dims`` dimensions). Adding a layer kind means
adding one row here (and its quantized class); modules that merely *contain* such layers
but bypass them (attention, transposed ``Conv1D``) are handled by module rewrites instead
(``ddq.layers.rewrite``).

Example:
    >>> from torch import nn
    >>> kind_of(nn.Conv2d(8, 8, 3, groups=8)).name, role_of(nn.Conv2d(8, 8, 3, groups=8))
    ('Conv2d', 'depthwise')
    >>> kind_named("Linear").weight_rank
    2
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import QuantLayer
from .conv import QuantConv1d, QuantConv2d
from .linear import QuantLinear

__all__ = [
    "LAYER_KINDS",
    "LayerKind",
    "is_depthwise",
    "kind_named",
    "kind_of",
    "role_of",
]


@dataclass(frozen=True)
class LayerKind:
    """One supported layer type.

    Attributes:
        name: the type name the manifest records (the float class's name).
        float_type: the float PyTorch class; ``prepare`` replaces exact instances only (a
            subclass may bypass ``forward``, as ``nn.MultiheadAttention``'s output
            projection does).
        quant_type: its quantized counterpart.
        spatial_dims: 0 for ``Linear``, 1 or 2 for convolutions.
    """

    name: str
    float_type: type[nn.Module]
    quant_type: type[QuantLayer]
    spatial_dims: int

    @property
    def weight_rank(self) -> int:
        """Rank of the weight tensor (``Linear`` 2, ``ConvNd`` N + 2); the manifest reads
        the type from it."""
        return self.spatial_dims + 2

    @property
    def is_conv(self) -> bool:
        return self.spatial_dims > 0

    def macs(self, module: nn.Module, output: torch.Tensor) -> int:
        """Multiply-accumulates per sample of ``module`` producing ``output``."""
        per_sample = output[0].numel() if output.dim() > 1 else output.numel()
        if not self.is_conv:
            return per_sample * module.in_features
        return per_sample * (module.in_channels // module.groups) * math.prod(module.kernel_size)


LAYER_KINDS: tuple[LayerKind, ...] = (
    LayerKind("Conv1d", nn.Conv1d, QuantConv1d, 1),
    LayerKind("Conv2d", nn.Conv2d, QuantConv2d, 2),
    LayerKind("Linear", nn.Linear, QuantLinear, 0),
)
_BY_NAME = {k.name: k for k in LAYER_KINDS}


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind ``module`` is an instance of (float, quantized or a subclass), else ``None``."""
    for kind in LAYER_KINDS:
        if isinstance(module, kind.float_type):
            return kind
    return None


def kind_named(name: str) -> LayerKind:
    """The kind the manifest calls ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown layer kind {name!r}; known: {sorted(_BY_NAME)}") from None


def is_depthwise(module: nn.Module) -> bool:
    """A convolution with one group per input channel (and more than one channel)."""
    kind = kind_of(module)
    return (
        kind is not None
        and kind.is_conv
        and module.groups > 1
        and module.groups == module.in_channels
    )


def role_of(module: nn.Module) -> str:
    """``"linear"``, ``"depthwise"``, ``"pointwise"`` (1x1 conv), ``"conv"``, or ``"other"``
    for a module that is not a supported kind (listed float by ``summary``)."""
    kind = kind_of(module)
    if kind is None:
        return "other"
    if not kind.is_conv:
        return "linear"
    if is_depthwise(module):
        return "depthwise"
    return "pointwise" if all(s == 1 for s in module.kernel_size) else "conv"
