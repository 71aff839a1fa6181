"""The ONNX export's graph passes, run on the captured ``onnx_ir`` graph.

* :func:`fold_batchnorm`: ``Conv(DQ(w)) -> Mul -> Add`` into a per-channel dequantization
  scale and the conv bias.
* :func:`clamps_to_integer`: a float ``Relu``/``Clip`` feeding a ``QuantizeLinear`` moved
  onto the integer codes, so ONNX Runtime can fuse the conv.
* :func:`drop_requantize`: ``DequantizeLinear -> QuantizeLinear`` with the same scale and
  zero point (a tensor's output quantizer that is also its reader's input quantizer,
  ``integer_graph``) becomes the codes themselves, exactly.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

__all__ = ["Graph", "clamps_to_integer", "drop_requantize", "fold_batchnorm"]


class Graph:
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


def fold_batchnorm(g: Graph) -> int:
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


def clamps_to_integer(g: Graph) -> int:
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


def _same(g: Graph, a: Any, b: Any) -> bool:
    x, y = g.const(a), g.const(b)
    return x is not None and y is not None and x.dtype == y.dtype and np.array_equal(x, y)


def drop_requantize(g: Graph) -> int:
    """``Q(DQ(c, s, z), s, z)`` -> ``c``, then a ``Clip`` of codes already clipped at least
    as tightly -> its input. Exact: ``round((c - z) s / s) + z == c`` for 8-bit codes."""
    dropped = 0
    for q in list(g.graph):
        if q.op_type != "QuantizeLinear" or len(q.inputs) < 3 or q.outputs[0].is_graph_output():
            continue
        dq = q.inputs[0].producer()
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.inputs) < 3:
            continue
        if "axis" in dq.attributes or not (
            _same(g, dq.inputs[1], q.inputs[1]) and _same(g, dq.inputs[2], q.inputs[2])
        ):
            continue
        q.outputs[0].replace_all_uses_with(dq.inputs[0])
        g.graph.remove(q, safe=True)
        dropped += 1
    for clip in list(g.graph):
        if clip.op_type != "Clip" or len(clip.inputs) < 3:
            continue
        inner = clip.inputs[0].producer()
        if inner is None or inner.op_type != "Clip" or len(inner.inputs) < 3:
            continue
        bounds = [g.const(v) for v in (*clip.inputs[1:3], *inner.inputs[1:3])]
        if any(b is None for b in bounds) or clip.outputs[0].is_graph_output():
            continue
        lo, hi, inner_lo, inner_hi = (b.item() for b in bounds)  # type: ignore[union-attr]
        if lo <= inner_lo and hi >= inner_hi:
            clip.outputs[0].replace_all_uses_with(clip.inputs[0])
            g.graph.remove(clip, safe=True)
    return dropped
