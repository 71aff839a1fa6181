"""The ONNX export's ops: ``ddq_onnx::*`` custom ops and their ONNX translations.

Eager implementations give the ONNX semantics in PyTorch (used by tracing for shapes, and
usable to check a graph); :func:`translations` emits the ONNX nodes for each.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["translations"]


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


def translations(opset_version: int) -> dict[Any, Any]:
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
