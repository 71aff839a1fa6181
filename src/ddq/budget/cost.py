"""Cost models of a prepared model: size in bits and BitOps, differentiable in the gates.

- size: ``sum over quantized layers of n_weights * b_w`` plus 32 bits for every other
  parameter (biases, BatchNorm, layers left float) and for every per-channel weight
  scale (one float per output channel of a per-channel quantizer). Level tables are
  deployment overhead reported by the exporter, not part of the budgeted cost (they are
  not linear in the gates and are at most 2^b floats per layer).
- BitOps: ``sum over conv/linear layers of MACs * b_w * b_a``; a float weight or input
  counts as 32 bits.
- output quantizers (``DDQConfig.integer_graph``): activation quantizers on tensors that
  no conv/linear multiplies (residual adds, pooling, the logits); they add no BitOps, are
  capped by ``max_act_bits`` like the input quantizers, and are listed in
  ``CostModel.output_quantizers`` (their bits by :meth:`CostModel.output_act_bits`).
- average weight bits: ``sum n_w b_w / sum n_w`` over quantized layers, so 4.0 means the
  size of a uniform 4-bit model (fixed first/last layers included at their bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..conversion.prepare import state_of
from ..layers import QuantLayer, kind_of
from ..quantizer import DDQQuantizer

__all__ = ["CostModel", "LayerCost"]

FLOAT_BITS = 32


@dataclass
class LayerCost:
    """Static facts about one conv/linear layer."""

    name: str
    weight_elements: int
    macs: int
    module: nn.Module

    @property
    def quantized(self) -> bool:
        return isinstance(self.module, QuantLayer)

    def w_bits(self) -> torch.Tensor:
        m = self.module
        if isinstance(m, QuantLayer) and m.quantize:
            return m.weight_quantizer.bits_tensor()
        return torch.tensor(float(FLOAT_BITS))

    def a_bits(self) -> torch.Tensor:
        m = self.module
        if isinstance(m, QuantLayer) and m.quantize and m.input_quantizer is not None:
            return m.input_quantizer.bits_tensor()
        return torch.tensor(float(FLOAT_BITS))


class CostModel:
    """Size and BitOps of a prepared model (MACs from the example input given to prepare).

    Example:
        >>> cm = CostModel(model)                     # doctest: +SKIP
        >>> cm.size_bytes(), cm.avg_weight_bits(), cm.gbitops()
    """

    def __init__(self, model: nn.Module) -> None:
        state_of(model)  # raises if not prepared
        self.layers: list[LayerCost] = []
        for name, m in model.named_modules():
            if kind_of(m) is not None:
                macs = getattr(m, "macs", None)
                if macs is None and isinstance(m, QuantLayer):
                    raise ValueError(
                        f"layer {name!r} has no MAC count: pass example_inputs to ddq.prepare"
                    )
                self.layers.append(LayerCost(name, m.weight.numel(), int(macs or 0), m))
        quantized_weights = {id(lc.module.weight) for lc in self.layers if lc.quantized}
        quantizer_params = {
            id(p) for m in model.modules() if isinstance(m, DDQQuantizer) for p in m.parameters()
        }
        #: parameters stored at 32 bits: everything but quantized weights and quantizer state
        self.float_params = sum(
            p.numel()
            for p in model.parameters()
            if id(p) not in quantized_weights and id(p) not in quantizer_params
        )
        self.quant_weight_elements = sum(lc.weight_elements for lc in self.layers if lc.quantized)
        from ..conversion.output_quantizers import output_quantizers

        #: integer_graph's output quantizers by module name (no MACs: no BitOps)
        self.output_quantizers = output_quantizers(model)
        #: per-channel weight scales, stored at 32 bits each
        self.channel_scales = sum(
            lc.module.weight_quantizer.channels or 0 for lc in self.layers if lc.quantized
        )

    # -- size
    def size_bits(self) -> torch.Tensor:
        """Model size in bits (differentiable in the weight gates)."""
        total = torch.tensor(float((self.float_params + self.channel_scales) * FLOAT_BITS))
        for lc in self.layers:
            bits = lc.w_bits() if lc.quantized else torch.tensor(0.0)
            total = total + lc.weight_elements * bits
        return total

    def size_bytes(self) -> float:
        return float(self.size_bits().detach()) / 8

    def fp32_bytes(self) -> float:
        """The same model with every parameter at 32 bits."""
        return (self.float_params + self.quant_weight_elements) * FLOAT_BITS / 8

    def weight_bits_sum(self) -> torch.Tensor:
        """``sum n_w b_w`` over quantized layers (differentiable)."""
        total = torch.tensor(0.0)
        for lc in self.layers:
            if lc.quantized:
                total = total + lc.weight_elements * lc.w_bits()
        return total

    def avg_weight_bits(self) -> float:
        return float(self.weight_bits_sum().detach()) / max(self.quant_weight_elements, 1)

    def avg_act_bits(self) -> float:
        """MAC-weighted average input bitwidth of the quantized layers."""
        num = den = 0.0
        for lc in self.layers:
            if lc.quantized:
                num += lc.macs * float(lc.a_bits().detach())
                den += lc.macs
        return num / den if den else float("nan")

    def output_act_bits(self) -> dict[str, int]:
        """Bits of each output quantizer (``integer_graph``), by module name."""
        return {n: int(q.bits) for n, q in self.output_quantizers.items()}

    # -- BitOps
    def bitops(self) -> torch.Tensor:
        """``sum MACs * b_w * b_a`` (differentiable in weight and activation gates)."""
        total = torch.tensor(0.0)
        for lc in self.layers:
            total = total + lc.macs * lc.w_bits() * lc.a_bits()
        return total

    def gbitops(self) -> float:
        return float(self.bitops().detach()) / 1e9

    def fp32_gbitops(self) -> float:
        return sum(lc.macs for lc in self.layers) * FLOAT_BITS * FLOAT_BITS / 1e9
