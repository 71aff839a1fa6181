"""The LSQ baseline: Learned Step Size Quantization (Esser et al., ICLR 2020), written out
on its own so that it follows the paper and nothing of ddq's quantizer.

Every Conv2d/Linear quantizes its weight and its input at a fixed bitwidth ``b`` with one
learned step ``s`` each: ``q(v) = round(clamp(v / s, -Qn, Qp)) * s`` with a straight-through
rounding. Weights are signed (``Qn = 2^(b-1)``, ``Qp = 2^(b-1) - 1``); an input is unsigned
(``Qn = 0``, ``Qp = 2^b - 1``) where the layer's float input is never negative (after a
ReLU), else signed. As in the paper:

- initialisation: ``s = 2 mean(|v|) / sqrt(Qp)``, from the weight for weight steps and from
  the first batch the layer sees for input steps;
- the step's gradient is scaled by ``g = 1 / sqrt(N Qp)``, ``N`` the number of weights of
  the layer (weights) or of features of one example (inputs);
- steps are trained by the same SGD as the weights.

The paper is per tensor (``per_channel=False``, the default); ``per_channel=True`` gives
each output channel its own weight step (initialised and gradient-scaled over that
channel's weights), the usual per-channel extension. The first and last layer use 8 bits,
the same convention as ddq's default, so model sizes compare.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LSQLayer", "LSQQuantizer", "lsq_quantize"]


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    return (x - x * g).detach() + x * g


def _round_pass(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


class LSQQuantizer(nn.Module):
    """One tensor's LSQ quantizer (see the module docstring)."""

    def __init__(self, bits: int, signed: bool, channels: int | None = None) -> None:
        super().__init__()
        self.bits, self.signed = bits, signed
        self.qn = 2 ** (bits - 1) if signed else 0
        self.qp = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        if self.qp < 1:  # a signed 1-bit grid {-1, 0} has no positive level: not LSQ's
            raise ValueError(f"LSQ needs Qp >= 1; {bits}-bit signed has Qp = {self.qp}")
        self.step = nn.Parameter(torch.ones(channels if channels is not None else ()))
        self.register_buffer("initialized", torch.tensor(False))

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        return self.step.view(-1, *([1] * (x.dim() - 1))) if self.step.dim() else self.step

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """LSQ's initialisation: ``2 mean(|x|) / sqrt(Qp)`` (per channel along axis 0)."""
        a = x.detach().abs()
        mean = a.flatten(1).mean(1) if self.step.dim() else a.mean()
        self.step.copy_((2 * mean / math.sqrt(self.qp)).clamp(min=1e-8))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        if not bool(self.initialized):
            self.init_from(x)
        per = n // self.step.numel() if self.step.dim() else n
        # |s|: SGD may push a step through zero (the paper does not say what then); its
        # magnitude is what quantizes, so the sign never flips the tensor.
        s = _grad_scale(self._view(x).abs().clamp(min=1e-8), 1.0 / math.sqrt(per * self.qp))
        return _round_pass((x / s).clamp(-self.qn, self.qp)) * s


class LSQLayer(nn.Module):
    """A Conv2d or Linear whose weight and input are LSQ-quantized."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, bits: int, signed_input: bool,
                 per_channel: bool) -> None:  # fmt: skip
        super().__init__()
        self.layer = layer
        out = layer.weight.shape[0]
        self.weight_quant = LSQQuantizer(bits, True, out if per_channel else None)
        self.input_quant = LSQQuantizer(bits, signed_input)
        self.weight_quant.init_from(layer.weight)  # the input step waits for the first batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_quant(self.layer.weight, self.layer.weight.numel())
        xq = self.input_quant(x, x[0].numel())
        m = self.layer
        if isinstance(m, nn.Conv2d):
            return F.conv2d(xq, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(xq, w, m.bias)


def lsq_quantize(
    model: nn.Module, bits: int, example: torch.Tensor, per_channel: bool = False
) -> nn.Module:
    """Wrap every Conv2d/Linear of ``model`` in place in an ``LSQLayer`` at ``bits``
    (first and last layer at 8). Input steps are set by the first forward pass."""
    from brevitas_baseline import input_signs, quantized_layer_names

    signed = input_signs(model, example)
    names, first, last = quantized_layer_names(model)
    for name in names:
        b = 8 if name in (first, last) else bits
        new = LSQLayer(model.get_submodule(name), b, signed[name], per_channel)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def step_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LSQ steps of ``model`` (kept out of weight decay)."""
    return [m.step for m in model.modules() if isinstance(m, LSQQuantizer)]
