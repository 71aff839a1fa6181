"""The ONNX export's per-layer handlers: each deploy module in an exportable form.

:func:`to_export_form` swaps every packed layer for :class:`OnnxLayer` and every
:class:`~ddq.deploy.runtime.ChannelAffine` for :class:`OnnxAffine`; their forwards call the
``ddq_onnx::*`` ops of :mod:`.ops`, so the graph holds exactly the pattern described in
:mod:`ddq.deploy.onnx_export`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...conversion.bias_rounding import BIAS_DELTA, applies
from ...conversion.output_quantizers import (
    OUTPUT_QUANTIZER,
    add_output_quantizer,
    output_quantizers,
)
from ..freeze import freeze
from ..int8_codes import adaptive_to_int8
from ..loader import build_runtime, set_submodule
from ..manifest import QuantSpec
from ..runtime import ChannelAffine, FrozenActivationQuantizer, PackedConv, PackedLayer
from . import ops  # noqa: F401  (registers the ddq_onnx ops)

__all__ = [
    "ADAPTIVE_WEIGHTS",
    "OnnxActivation",
    "OnnxAffine",
    "OnnxLayer",
    "deploy_model",
    "grid_container",
    "to_export_form",
]


def grid_container(spec: QuantSpec, signed: bool) -> tuple[int, int, int]:
    """``(zero_point, lo, hi)`` of a uniform ``b``-bit grid in an int8 or uint8 container.

    Codes ``j`` in ``0..2**b - 1`` with values ``scale * (j - Z)`` are stored as ``j`` in
    uint8 (zero point ``Z``) or as ``j - 2**(b-1)`` in int8 (zero point
    ``Z - 2**(b-1)``, 0 for DDQ's symmetric signed grids).
    """
    assert spec.zero_point is not None
    shift = 2 ** (spec.bits - 1) if signed else 0
    return spec.zero_point - shift, -shift, spec.levels - 1 - shift


class OnnxActivation(nn.Module):
    def __init__(self, q: FrozenActivationQuantizer) -> None:
        super().__init__()
        self.spec = q.spec
        self.register_buffer("thresholds", q.thresholds.clone())
        self.register_buffer("table", q.table.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.mode == "uniform":
            assert s.scale is not None
            # Activations always in uint8 (signed grids with zero point 2**(b-1)): ONNX
            # Runtime fuses a conv into QLinearConv only when its input and output
            # activations share one type, and uint8 x int8 is its best-supported kernel.
            zero, lo, hi = grid_container(s, signed=False)
            return torch.ops.ddq_onnx.qdq(x, s.scale, zero, lo, hi)
        return torch.ops.ddq_onnx.threshold_quantize(x, self.thresholds, self.table, s.bits)


#: How adaptive weights export: ``"table"`` (Gather on the levels: exact, float conv),
#: ``"int8"`` (levels mapped onto per-channel int8 grids: integer conv, mapping error) or
#: ``"auto"`` (int8 where the layer's input is uniform, i.e. where the conv can run on
#: integers; table elsewhere).
ADAPTIVE_WEIGHTS = ("auto", "int8", "table")


def _int8_weights(layer: PackedLayer, adaptive_weights: str) -> bool:
    if layer.spec.weight.mode != "adaptive" or adaptive_weights == "table":
        return False
    if adaptive_weights == "int8":
        return True
    q = layer.spec.input
    return q is not None and q.mode == "uniform"


class OnnxLayer(nn.Module):
    """A packed layer as ONNX-exportable ops (see the module docstring).

    ``int8_mapping`` is the relative RMSE of the int8 form of adaptive weights (``None``
    when the layer exports exactly).
    """

    def __init__(self, layer: PackedLayer, adaptive_weights: str = "auto") -> None:
        super().__init__()
        self.spec = layer.spec
        self.int8_mapping: float | None = None
        self.is_conv = isinstance(layer, PackedConv)
        if self.is_conv:
            self.dims = layer.dims
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
            self.groups, self.padding_mode, self.pads = (
                layer.groups,
                layer.padding_mode,
                layer.pads,
            )
        codes = layer.weight_codes()
        w = self.spec.weight
        channels = self.spec.weight_shape[0]
        axis0 = (channels,) + (1,) * (len(self.spec.weight_shape) - 1)
        self.w_scale: torch.Tensor | None
        self.int8 = _int8_weights(layer, adaptive_weights)
        if self.int8:
            # The fast path: learned levels onto per-channel int8 grids (int8_codes.py);
            # the graph then holds the same DequantizeLinear pattern as uniform weights.
            mapped = adaptive_to_int8(layer.weight_table, codes, layer.weight_scale)
            self.int8_mapping = mapped.relative_rmse
            self.register_buffer("codes", mapped.codes)
            self.register_buffer("w_scale", mapped.scale.expand(channels).clone())
            self.register_buffer("w_zero_point", torch.zeros(channels, dtype=torch.int8))
        elif w.mode == "uniform":
            zero, lo, _ = grid_container(w, signed=w.signed)
            container = torch.int8 if w.signed else torch.uint8
            self.register_buffer("codes", (codes.to(torch.int16) + lo).to(container))
            self.w_zero = zero
            if w.per_channel:
                assert layer.weight_scale is not None and w.scale is not None
                # The channel's integer step: a power of two times float32, exact.
                step = (layer.weight_scale.double() * w.scale).float()
                self.register_buffer("w_scale", step)
                self.register_buffer("w_zero_point", torch.full((channels,), zero, dtype=container))
            else:
                self.register_buffer("w_scale", None)
        else:
            self.register_buffer("codes", codes.clone())
            self.register_buffer("table", layer.weight_table.clone())
            scale = layer.weight_scale
            self.register_buffer("w_scale", None if scale is None else scale.reshape(axis0).clone())
        bias = layer.bias
        if bias is None and self.is_conv:
            # A bias-less conv exports with a zero bias computed at run time (Shape, Expand),
            # which blocks both BatchNorm folding and ONNX Runtime's QLinearConv fusion.
            bias = torch.zeros(self.spec.weight_shape[0])
        self.register_buffer("bias", None if bias is None else bias.clone())
        q = layer.input_quantizer
        self.input_quantizer = None if q is None else OnnxActivation(q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.spec.weight
        if (w.mode == "uniform" or self.int8) and self.w_scale is not None:
            weight = torch.ops.ddq_onnx.dequantize_per_channel(
                self.codes, self.w_scale, self.w_zero_point
            )
        elif w.mode == "uniform":
            weight = torch.ops.ddq_onnx.dequantize(self.codes, w.scale, self.w_zero)
        else:
            weight = torch.ops.ddq_onnx.gather_levels(self.codes, self.table)
            if self.w_scale is not None:
                weight = weight * self.w_scale
        if not self.is_conv:
            return F.linear(x, weight, self.bias)
        fn = F.conv1d if self.dims == 1 else F.conv2d
        if self.padding_mode != "zeros":
            x = F.pad(x, self.pads, mode=self.padding_mode)
            return fn(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return fn(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class OnnxAffine(nn.Module):
    def __init__(self, affine: ChannelAffine, rank: int) -> None:
        super().__init__()
        # Shaped for broadcasting over (N, C, *spatial) so the graph has a plain Mul/Add
        # with constant operands (what the BatchNorm folding pass looks for).
        shape = (-1,) + (1,) * max(rank - 2, 0)
        self.register_buffer("scale", affine.scale.reshape(shape).clone())
        self.register_buffer("bias", affine.bias.reshape(shape).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.bias


@torch.no_grad()
def _bake_bias_rounding(old: nn.Module, new: nn.Module, rank: int) -> None:
    """``integer_graph``: the runtime's bias rounding (a hook on ``old``, whose output has
    ``rank`` dimensions) written into ``new``'s bias, so the graph holds the rounded bias
    ``b'``: ONNX Runtime's own rounding then leaves it where it is, and the float
    (unoptimised) graph computes it too."""
    fn = old.__dict__.get(BIAS_DELTA)
    delta = None if fn is None or not applies(old, rank) else fn()
    if delta is None:
        return
    bias = getattr(new, "bias", None)
    if bias is None:
        new.bias = delta.clone()  # a Linear without bias: the correction is its bias
    else:
        new.bias = bias + delta.reshape(bias.shape)


def to_export_form(
    runtime: nn.Module, args: tuple[Any, ...], adaptive_weights: str = "auto"
) -> nn.Module:
    """A copy of the deploy runtime with every deploy module in its ONNX form
    (``adaptive_weights``: see :data:`ADAPTIVE_WEIGHTS`)."""
    if adaptive_weights not in ADAPTIVE_WEIGHTS:
        raise ValueError(
            f"adaptive_weights must be one of {ADAPTIVE_WEIGHTS}, got {adaptive_weights!r}"
        )
    ranks: dict[str, int] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, inp, name=n: ranks.__setitem__(name, inp[0].dim()))
        for n, m in runtime.named_modules()
        if isinstance(m, ChannelAffine) or BIAS_DELTA in m.__dict__
    ]
    try:
        with torch.no_grad():
            runtime(*args)
    finally:
        for h in hooks:
            h.remove()
    form = copy.deepcopy(runtime)
    for name, m in list(form.named_modules()):
        new: nn.Module | None = None
        if isinstance(m, PackedLayer):
            new = OnnxLayer(m, adaptive_weights)
        elif isinstance(m, ChannelAffine):
            new = OnnxAffine(m, ranks.get(name, 4))
        if new is not None:
            _bake_bias_rounding(m, new, ranks.get(name, 4))
            set_submodule(form, name, new)
            q = m._modules.get(OUTPUT_QUANTIZER)
            if q is not None:  # integer_graph: the output quantizer moves with its module
                add_output_quantizer(new, q)
    for name, q in output_quantizers(form).items():
        if isinstance(q, FrozenActivationQuantizer):
            add_output_quantizer(form.get_submodule(name), OnnxActivation(q))
    return form.eval()


def deploy_model(model: nn.Module) -> nn.Module:
    """The deploy runtime for ``model``: a loaded one as is, a prepared one frozen."""
    if any(isinstance(m, PackedLayer) for m in model.modules()):
        return model
    if getattr(model, "ddq_state", None) is not None:
        manifest, tensors, _ = freeze(model)
        return build_runtime(copy.deepcopy(model).cpu(), manifest, tensors, source="model")
    raise ValueError(
        "export_onnx needs a model prepared with ddq.prepare (and calibrated) or one "
        "returned by ddq.load"
    )
