"""ONNX export of a DDQ model in standard operators, checked in ONNX Runtime.

Per quantizer mode (opset 20 by default, 18..23; nothing outside the default ONNX domain):

* **uniform** weights: an int8 (signed) or uint8 initializer holding the ``b``-bit codes,
  then ``DequantizeLinear``: per tensor, or per channel (``axis=0``, a ``(C,)`` scale
  vector and a ``(C,)`` zero point, all equal) for per-channel weights. When a BatchNorm
  follows the conv, its per-channel scale is folded into the (then per-channel,
  ``axis=0``) dequantization scale and its bias into the conv bias: the integer weights
  stay exactly the ``b``-bit grid.
* **uniform** activations: ``QuantizeLinear`` to uint8 (zero point ``2**(b-1)`` for a
  signed grid), a ``Clip`` on the integer codes to the ``b``-bit range (for ``b < 8``),
  ``DequantizeLinear``. ONNX Runtime fuses
  ``DequantizeLinear -> Conv -> QuantizeLinear`` into its integer ``QLinearConv`` kernel.
  A float ``Relu``/``Clip`` (ReLU6) feeding a ``QuantizeLinear`` is moved after it, onto
  the integer codes (exact: quantization is monotone, so it commutes with clamping), which
  lets the fusion happen for ReLU6 networks too.
* **adaptive** weights: a uint8 initializer of level indices, ``Cast`` to int64,
  ``Gather`` on the ``2**b`` table; per-channel weights then ``Mul`` by their channel
  scales, shaped ``(C, 1, ...)`` to broadcast over axis 0 (the same float32 multiply as
  in training, so the weights are exact).
* **adaptive** activations: a binary search over the ``2**b - 1`` thresholds in ``b``
  steps of ``Gather``/``Greater``/``Where`` (O(N b) work, never N x 2**b), then
  ``Gather`` on the table.
* BatchNorm not folded: per-channel ``Mul`` and ``Add``.

The graph is captured with ``torch.onnx.export(..., dynamo=True)``; the deploy modules are
swapped for thin modules that call custom ops (``ddq_onnx::*``) translated by the functions
below, so the emitted pattern is exactly the one described, not whatever a decomposition
would produce.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..conversion.macs import as_args
from .artifact import freeze
from .manifest import QuantSpec
from .runtime import (
    ChannelAffine,
    FrozenActivationQuantizer,
    _PackedConv,
    _PackedLayer,
    _set_submodule,
    build_runtime,
)

__all__ = ["DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "export_onnx"]

DEFAULT_OPSET = 20
MIN_OPSET, MAX_OPSET = 18, 23


# ------------------------------------------------------------------------- custom ops
# Eager implementations give the ONNX semantics in PyTorch (used by tracing for shapes,
# and usable to check a graph); the translations below emit the ONNX nodes.
@torch.library.custom_op("ddq_onnx::qdq", mutates_args=())
def _qdq(x: torch.Tensor, scale: float, zero_point: int, lo: int, hi: int) -> torch.Tensor:
    q = torch.clamp(torch.round(x / scale) + zero_point, lo, hi)
    return (q - zero_point) * scale


@_qdq.register_fake
def _(x, scale, zero_point, lo, hi):
    return torch.empty_like(x)


@torch.library.custom_op("ddq_onnx::dequantize", mutates_args=())
def _dequantize(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return (q.float() - zero_point) * scale


@_dequantize.register_fake
def _(q, scale, zero_point):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


@torch.library.custom_op("ddq_onnx::dequantize_per_channel", mutates_args=())
def _dequantize_per_channel(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
) -> torch.Tensor:
    shape = (-1,) + (1,) * (q.dim() - 1)  # axis 0
    return (q.float() - zero_point.float().view(shape)) * scale.view(shape)


@_dequantize_per_channel.register_fake
def _(q, scale, zero_point):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


@torch.library.custom_op("ddq_onnx::gather_levels", mutates_args=())
def _gather_levels(codes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return table[codes.long()]


@_gather_levels.register_fake
def _(codes, table):
    return torch.empty(codes.shape, dtype=table.dtype, device=codes.device)


@torch.library.custom_op("ddq_onnx::threshold_quantize", mutates_args=())
def _threshold_quantize(
    x: torch.Tensor, thresholds: torch.Tensor, table: torch.Tensor, bits: int
) -> torch.Tensor:
    return table[torch.bucketize(x, thresholds)]


@_threshold_quantize.register_fake
def _(x, thresholds, table, bits):
    return torch.empty_like(x)


def _translations(opset_version: int) -> dict[Any, Any]:
    """The ONNX translation of each custom op (onnxscript, imported only when exporting)."""
    import onnxscript
    from onnxscript import ir

    op = getattr(onnxscript, f"opset{opset_version}")

    def const(value: Any, dtype: Any) -> Any:
        return op.Constant(value=ir.tensor(np.array(value, dtype=dtype)))

    def qdq(x, scale: float, zero_point: int, lo: int, hi: int):
        s, z = const(scale, np.float32), const(zero_point, np.uint8)
        q = op.QuantizeLinear(x, s, z)
        if lo > 0 or hi < 255:  # the b-bit range, on the integer codes
            q = op.Clip(q, const(lo, np.uint8), const(hi, np.uint8))
        return op.DequantizeLinear(q, s, z)

    def dequantize(q, scale: float, zero_point: int):
        dtype = np.int8 if q.dtype == ir.DataType.INT8 else np.uint8
        return op.DequantizeLinear(q, const(scale, np.float32), const(zero_point, dtype))

    def dequantize_per_channel(q, scale, zero_point):
        return op.DequantizeLinear(q, scale, zero_point, axis=0)

    def gather_levels(codes, table):
        return op.Gather(table, op.Cast(codes, to=ir.DataType.INT64))

    def threshold_quantize(x, thresholds, table, bits: int):
        # Binary search: after the step for bit k, idx counts the thresholds below x among
        # those the search has passed; b steps, each O(N).
        half = 2 ** (bits - 1)
        first = op.Greater(x, op.Gather(thresholds, const(half - 1, np.int64)))
        idx = op.Where(first, const(half, np.int64), const(0, np.int64))
        for k in reversed(range(bits - 1)):
            step = 2**k
            probe = op.Gather(thresholds, op.Add(idx, const(step - 1, np.int64)))
            idx = op.Where(op.Greater(x, probe), op.Add(idx, const(step, np.int64)), idx)
        return op.Gather(table, idx)

    return {
        torch.ops.ddq_onnx.qdq.default: qdq,
        torch.ops.ddq_onnx.dequantize.default: dequantize,
        torch.ops.ddq_onnx.dequantize_per_channel.default: dequantize_per_channel,
        torch.ops.ddq_onnx.gather_levels.default: gather_levels,
        torch.ops.ddq_onnx.threshold_quantize.default: threshold_quantize,
    }


# ------------------------------------------------------------------------- export modules
def _container(spec: QuantSpec, signed: bool) -> tuple[int, int, int]:
    """``(zero_point, lo, hi)`` of a uniform ``b``-bit grid in an int8 or uint8 container.

    Codes ``j`` in ``0..2**b - 1`` with values ``scale * (j - Z)`` are stored as ``j`` in
    uint8 (zero point ``Z``) or as ``j - 2**(b-1)`` in int8 (zero point
    ``Z - 2**(b-1)``, 0 for DDQ's symmetric signed grids).
    """
    assert spec.zero_point is not None
    shift = 2 ** (spec.bits - 1) if signed else 0
    return spec.zero_point - shift, -shift, spec.levels - 1 - shift


class _OnnxActivation(nn.Module):
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
            zero, lo, hi = _container(s, signed=False)
            return torch.ops.ddq_onnx.qdq(x, s.scale, zero, lo, hi)
        return torch.ops.ddq_onnx.threshold_quantize(x, self.thresholds, self.table, s.bits)


class _OnnxLayer(nn.Module):
    """A packed layer as ONNX-exportable ops (see the module docstring)."""

    def __init__(self, layer: _PackedLayer) -> None:
        super().__init__()
        self.spec = layer.spec
        self.is_conv = isinstance(layer, _PackedConv)
        if self.is_conv:
            self.dims = layer._dims
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
            self.groups, self.padding_mode, self.pads = (
                layer.groups,
                layer.padding_mode,
                layer._pads,
            )
        codes = layer.weight_codes()
        w = self.spec.weight
        channels = self.spec.weight_shape[0]
        axis0 = (channels,) + (1,) * (len(self.spec.weight_shape) - 1)
        self.w_scale: torch.Tensor | None
        if w.mode == "uniform":
            zero, lo, _ = _container(w, signed=w.signed)
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
        self.input_quantizer = None if q is None else _OnnxActivation(q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.spec.weight
        if w.mode == "uniform" and self.w_scale is not None:
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


class _OnnxAffine(nn.Module):
    def __init__(self, affine: ChannelAffine, rank: int) -> None:
        super().__init__()
        # Shaped for broadcasting over (N, C, *spatial) so the graph has a plain Mul/Add
        # with constant operands (what the BatchNorm folding pass looks for).
        shape = (-1,) + (1,) * max(rank - 2, 0)
        self.register_buffer("scale", affine.scale.reshape(shape).clone())
        self.register_buffer("bias", affine.bias.reshape(shape).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.bias


def _to_export_form(runtime: nn.Module, args: tuple[Any, ...]) -> nn.Module:
    """A copy of the deploy runtime with every deploy module in its ONNX form."""
    ranks: dict[str, int] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, inp, name=n: ranks.__setitem__(name, inp[0].dim()))
        for n, m in runtime.named_modules()
        if isinstance(m, ChannelAffine)
    ]
    try:
        with torch.no_grad():
            runtime(*args)
    finally:
        for h in hooks:
            h.remove()
    form = copy.deepcopy(runtime)
    for name, m in list(form.named_modules()):
        if isinstance(m, _PackedLayer):
            _set_submodule(form, name, _OnnxLayer(m))
        elif isinstance(m, ChannelAffine):
            _set_submodule(form, name, _OnnxAffine(m, ranks.get(name, 4)))
    return form.eval()


def _deploy_model(model: nn.Module) -> nn.Module:
    """The deploy runtime for ``model``: a loaded one as is, a prepared one frozen."""
    if any(isinstance(m, _PackedLayer) for m in model.modules()):
        return model
    if getattr(model, "ddq_state", None) is not None:
        manifest, tensors, _ = freeze(model)
        return build_runtime(copy.deepcopy(model).cpu(), manifest, tensors, source="model")
    raise ValueError(
        "export_onnx needs a model prepared with ddq.prepare (and calibrated) or one "
        "returned by ddq.load"
    )


# ------------------------------------------------------------------------- graph passes
class _Graph:
    """Small helpers over an ``onnx_ir`` graph for the two rewrites below."""

    def __init__(self, graph: Any) -> None:
        from onnxscript import ir

        self.ir = ir
        self.graph = graph
        self._names = itertools.count()

    def const(self, value: Any) -> np.ndarray | None:
        """The value of a constant (initializer, ``Constant``, or a cast of one), else None."""
        if value is None:
            return None
        t = self.ir.convenience.get_const_tensor(value)
        if t is not None:
            return t.numpy()
        # The exporter writes Clip bounds (ReLU6) as CastLike(constant, x).
        node = value.producer()
        if node is None or node.op_type not in ("Cast", "CastLike"):
            return None
        source = self.const(node.inputs[0])
        if source is None or value.dtype is None:
            return source  # the value is what matters to the callers, not its width
        return source.astype(value.dtype.numpy())

    def initializer(self, array: np.ndarray, hint: str) -> Any:
        value = self.ir.Value(
            name=f"ddq_{hint}_{next(self._names)}", const_value=self.ir.tensor(array)
        )
        self.graph.register_initializer(value)
        return value

    @staticmethod
    def only_consumer(value: Any, op_type: str) -> Any:
        users = value.consumers()
        if len(users) != 1 or value.is_graph_output() or users[0].op_type != op_type:
            return None
        return users[0]


def _per_channel(c: np.ndarray | None, channels: int) -> np.ndarray | None:
    """``c`` as a ``(C,)`` vector if it broadcasts per channel over ``(N, C, ...)``."""
    if c is None or c.dtype != np.float32 or c.size != channels:
        return None
    if c.ndim < 2 and channels != 1:
        return None  # (C,) would broadcast over the last axis, not the channels
    return c.reshape(-1)


def _fold_batchnorm(g: _Graph) -> int:
    """``Conv(DQ(w)) -> Mul(c) -> Add(d)`` becomes ``Conv(DQ_per_channel(w, s c), b c + d)``.

    ``s`` is the weight's per-tensor scale or its per-channel (``axis=0``) scale vector.
    """
    folded = 0
    for conv in list(g.graph):
        if conv.op_type != "Conv" or len(conv.inputs) < 2:
            continue
        dq = conv.inputs[1].producer()
        if dq is None or dq.op_type != "DequantizeLinear" or len(conv.inputs[1].consumers()) != 1:
            continue
        scale, zero = g.const(dq.inputs[1]), g.const(dq.inputs[2] if len(dq.inputs) > 2 else None)
        codes = g.const(dq.inputs[0])
        if scale is None or zero is None or codes is None:
            continue
        channels = codes.shape[0]
        axis = dq.attributes.get("axis")
        per_axis0 = axis is not None and axis.value in (0, -codes.ndim)
        if not (scale.size == 1 or (per_axis0 and scale.size == channels == zero.size)):
            continue
        mul = g.only_consumer(conv.outputs[0], "Mul")
        add = g.only_consumer(mul.outputs[0], "Add") if mul is not None else None
        if add is None:
            continue
        other = next((v for v in mul.inputs if v is not conv.outputs[0]), None)
        shift = next((v for v in add.inputs if v is not mul.outputs[0]), None)
        c, d = _per_channel(g.const(other), channels), _per_channel(g.const(shift), channels)
        if c is None or d is None:
            continue
        bias = (
            g.const(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
        )
        new_bias = (d if bias is None else bias * c + d).astype(np.float32)
        new_scale = (scale.reshape(-1).astype(np.float64) * c).astype(np.float32)
        dq.replace_input_with(1, g.initializer(new_scale, "w_scale"))
        new_zero = np.broadcast_to(zero.reshape(-1), (channels,)).astype(zero.dtype)
        dq.replace_input_with(2, g.initializer(new_zero, "w_zero"))
        dq.attributes["axis"] = g.ir.AttrInt64("axis", 0)
        conv.resize_inputs(3)
        conv.replace_input_with(2, g.initializer(new_bias, "bias"))
        add.outputs[0].replace_all_uses_with(conv.outputs[0], replace_graph_outputs=True)
        g.graph.remove([add, mul], safe=True)
        folded += 1
    return folded


def _quantize_np(v: float, scale: float, zero: int, dtype: np.dtype) -> int:
    info = np.iinfo(dtype)
    q = np.round(np.float32(v) / np.float32(scale)) + zero  # round half to even, as ONNX
    return int(np.clip(q, info.min, info.max))


def _clamps_to_integer(g: _Graph) -> int:
    """Move a float ``Relu``/``Clip`` that only feeds a ``QuantizeLinear`` onto the codes."""
    moved = 0
    for q in list(g.graph):
        if q.op_type != "QuantizeLinear":
            continue
        clamp = q.inputs[0].producer()
        if clamp is None or clamp.op_type not in ("Relu", "Clip"):
            continue
        if len(q.inputs[0].consumers()) != 1 or q.inputs[0].is_graph_output():
            continue
        scale, zero = g.const(q.inputs[1]), g.const(q.inputs[2] if len(q.inputs) > 2 else None)
        if scale is None or zero is None or scale.size != 1:
            continue
        bounds: list[float | None] = [0.0, None]
        if clamp.op_type == "Clip":
            ins = list(clamp.inputs) + [None] * (3 - len(clamp.inputs))
            consts = [g.const(v) for v in ins[1:3]]
            if any(v is not None and c is None for v, c in zip(ins[1:3], consts, strict=True)):
                continue  # a bound that is not a constant
            bounds = [None if c is None else float(c) for c in consts]
        dtype = zero.dtype
        info = np.iinfo(dtype)
        lo = (
            info.min
            if bounds[0] is None
            else _quantize_np(bounds[0], scale.item(), zero.item(), dtype)
        )
        hi = (
            info.max
            if bounds[1] is None
            else _quantize_np(bounds[1], scale.item(), zero.item(), dtype)
        )
        out = q.outputs[0]
        clip = g.only_consumer(out, "Clip")
        if clip is not None and all(g.const(v) is not None for v in clip.inputs[1:3]):
            lo = max(lo, int(g.const(clip.inputs[1])))
            hi = min(hi, int(g.const(clip.inputs[2])))
            clip.replace_input_with(1, g.initializer(np.array(lo, dtype), "lo"))
            clip.replace_input_with(2, g.initializer(np.array(hi, dtype), "hi"))
        elif lo > info.min or hi < info.max:
            lo_v, hi_v = (
                g.initializer(np.array(lo, dtype), "lo"),
                g.initializer(np.array(hi, dtype), "hi"),
            )
            clip = g.ir.Node("", "Clip", [out, lo_v, hi_v], num_outputs=1)
            g.graph.insert_after(q, clip)
            for user, index in list(out.uses()):
                if user is not clip:
                    user.replace_input_with(index, clip.outputs[0])
            if out.is_graph_output():
                out.replace_all_uses_with(clip.outputs[0], replace_graph_outputs=True)
                clip.replace_input_with(0, out)
        q.replace_input_with(0, clamp.inputs[0])
        g.graph.remove(clamp, safe=True)
        moved += 1
    return moved


# ------------------------------------------------------------------------- entry point
def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_inputs: Any,
    *,
    opset_version: int = DEFAULT_OPSET,
    fold_batchnorm: bool = True,
    dynamic_batch: bool = False,
) -> Path:
    """Export a DDQ model to ONNX (standard ops; see the module docstring for the graph).

    Args:
        model: a prepared, calibrated model (frozen on the fly) or one from ``ddq.load``;
            it is not modified.
        path: the ``.onnx`` file to write (weights inside the file).
        example_inputs: a tensor or tuple of positional inputs (shapes of the graph).
        opset_version: ONNX opset, 18..23 (default 20).
        fold_batchnorm: fold BatchNorms after uniform convs into their dequantization scale.
        dynamic_batch: make dimension 0 of every input dynamic.

    Returns:
        ``path`` as a ``Path``.

    Example:
        >>> export_onnx(model, "model.onnx", torch.randn(1, 3, 32, 32))  # doctest: +SKIP
        >>> import onnxruntime as ort
        >>> ort.InferenceSession("model.onnx").run(None, {"x": x.numpy()})  # doctest: +SKIP
    """
    import onnx

    if not MIN_OPSET <= opset_version <= MAX_OPSET:
        raise ValueError(
            f"opset_version must be in {MIN_OPSET}..{MAX_OPSET}, got {opset_version} (the "
            "PyTorch exporter builds opset 18 graphs; older ones need a lossy conversion)"
        )
    path = Path(path)
    args = as_args(example_inputs)
    form = _to_export_form(_deploy_model(model), args)
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic = tuple({0: batch} for _ in args)
    # The exporter prints progress lines even with verbose=False; failures still raise.
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            form,
            args,
            dynamo=True,
            optimize=False,  # it would constant-fold the small Cast+Gather weight decoders
            opset_version=opset_version,
            custom_translation_table=_translations(opset_version),
            dynamic_shapes=dynamic,
            verbose=False,
        )
    assert program is not None
    g = _Graph(program.model.graph)
    if fold_batchnorm:
        _fold_batchnorm(g)
    _clamps_to_integer(g)
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(program.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path, external_data=False)
    onnx.checker.check_model(str(path))
    return path
