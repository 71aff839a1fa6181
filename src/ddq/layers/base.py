"""What every quantized layer shares: a weight quantizer and an input quantizer."""

from __future__ import annotations

import torch
from torch import nn

from ..quantizer import DDQQuantizer

__all__ = ["QuantLayer", "quantizers_of"]


class QuantLayer:
    """Mixin for a float layer that quantizes its weight and its input activation.

    Attributes:
        weight_quantizer: the weight's ``DDQQuantizer``.
        input_quantizer: the input activation's ``DDQQuantizer``, or ``None`` to keep the
            input in floating point.
        quantize: ``False`` makes the layer compute exactly as the float layer.
        macs: multiply-accumulates per sample, set by ``ddq.prepare`` when it is given
            example inputs (``None`` otherwise).
    """

    weight: nn.Parameter
    weight_quantizer: DDQQuantizer
    input_quantizer: DDQQuantizer | None

    def _attach(self, weight_q: DDQQuantizer, input_q: DDQQuantizer | None) -> None:
        self.weight_quantizer = weight_q
        self.input_quantizer = input_q
        self.quantize = True
        self.macs: int | None = None

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the forward pass uses it."""
        return self.weight_quantizer(self.weight) if self.quantize else self.weight

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize and self.input_quantizer is not None:
            return self.input_quantizer(x)
        return x

    @classmethod
    def from_float(
        cls, module: nn.Module, weight_q: DDQQuantizer, input_q: DDQQuantizer | None
    ) -> QuantLayer:
        """A quantized layer that shares ``module``'s parameters (no copy)."""
        layer = cls.__new__(cls)
        # Adopt the float module's whole state (parameters, buffers, hyper-parameters,
        # hooks), so the result computes exactly as ``module`` with quantization off.
        layer.__dict__ = module.__dict__.copy()
        layer._modules = dict(module._modules)
        layer._parameters = dict(module._parameters)
        layer._buffers = dict(module._buffers)
        layer._attach(weight_q, input_q)
        return layer


def quantizers_of(model: nn.Module) -> dict[str, DDQQuantizer]:
    """Every ``DDQQuantizer`` in ``model`` by its full module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DDQQuantizer)}
