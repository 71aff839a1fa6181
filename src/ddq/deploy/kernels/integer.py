"""Integer (uniform-grid) kernels: exact integer GEMMs with gemmlowp zero-point corrections.

``int_gemm``, ``int_linear`` and ``int_conv2d`` multiply the raw indices in exact integer
arithmetic and apply the zero-point corrections afterwards (see :mod:`ddq.deploy.kernels`).
"""

from __future__ import annotations

import math

import torch

from .common import (
    F64_EXACT,
    IntPair,
    Scalar,
    check_int_operands,
    check_int_tensor,
    epilogue,
    float_param,
    int_param,
    scalar_float,
    scalar_int,
)
from .im2col import ConvGeom

__all__ = ["int_conv2d", "int_gemm", "int_linear"]


def _exact_int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int64 ``a @ b`` for int64 operands (batched like ``torch.matmul``)."""
    k = a.shape[-1]
    bound = 0
    if a.numel() and b.numel():
        bound = int(a.abs().max()) * int(b.abs().max()) * k
    if bound < F64_EXACT:
        # Every product and partial sum is an integer below 2**53: float64 is exact here,
        # whatever the summation order, and much faster than torch's integer matmul.
        return torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.int64)
    if bound >= 2**63:
        raise ValueError(
            f"integer GEMM may overflow int64 (max |a| * max |b| * K = {bound}); "
            "indices are expected to be small (<= 8 bits)"
        )
    # Integer matmul is only implemented on CPU.
    return torch.matmul(a.cpu(), b.cpu()).to(a.device)


def _int_acc(xq: torch.Tensor, zx: int, wq: torch.Tensor, zw: torch.Tensor) -> torch.Tensor:
    """Grouped zero-point-corrected integer accumulator.

    Args:
        xq: (G, M, K) int64 activation indices.
        zx: Activation zero point.
        wq: (G, Og, K) int64 weight indices.
        zw: (G, 1, Og) int64 weight zero points.

    Returns:
        (G, M, Og) int64 ``sum_k (xq - zx) * (wq - zw)``.
    """
    k = xq.shape[-1]
    prod = _exact_int_matmul(xq, wq.transpose(-1, -2))
    sum_x = xq.sum(-1, keepdim=True)  # (G, M, 1)
    sum_w = wq.sum(-1).unsqueeze(1)  # (G, 1, Og)
    return prod - zw * sum_x - zx * sum_w + k * zx * zw


def int_gemm(
    x_idx: torch.Tensor, x_zero: Scalar, w_idx: torch.Tensor, w_zero: Scalar
) -> torch.Tensor:
    """Exact integer GEMM with zero-point corrections: ``sum_k (x - zx) * (w - zw)``.

    The product is formed on the raw indices and corrected with the gemmlowp identity
    ``sum xq*wq - zw*sum xq - zx*sum wq + K*zx*zw``, i.e. what an unsigned-index integer kernel
    with int32 accumulation computes (here accumulated exactly in int64; with 8-bit operands
    an int32 accumulator is itself exact up to K = 2**31 / 255**2, about 33 000).

    Args:
        x_idx: (*, K) integer activation indices.
        x_zero: Per-tensor integer activation zero point.
        w_idx: (O, K) integer weight indices.
        w_zero: Integer weight zero point, scalar or per output channel (O,).

    Returns:
        (*, O) int64 accumulator.

    Example:
        >>> x = torch.tensor([[3, 0, 1]], dtype=torch.uint8)
        >>> w = torch.tensor([[0, 1, 2], [3, 3, 3]], dtype=torch.uint8)
        >>> int_gemm(x, 1, w, 2)  # (x - 1) = [2, -1, 0]; (w - 2) = [[-2, -1, 0], [1, 1, 1]]
        tensor([[-3,  1]])
    """
    x_idx, w_idx, o, k = check_int_operands(x_idx, w_idx)
    zx = scalar_int(x_zero, "x_zero")
    zw = int_param(w_zero, o, "w_zero", w_idx.device)
    xq = x_idx.reshape(1, math.prod(x_idx.shape[:-1]), k).to(torch.int64)
    acc = _int_acc(xq, zx, w_idx.to(torch.int64).unsqueeze(0), zw.view(1, 1, o))
    return acc.reshape(*x_idx.shape[:-1], o)


def _int_real(
    xq: torch.Tensor,
    zx: int,
    sx: float,
    wq: torch.Tensor,
    zw: torch.Tensor,
    sw: torch.Tensor,
    ow: torch.Tensor,
) -> torch.Tensor:
    """float64 ``sum_k sx*(xq - zx) * (sw*(wq - zw) + ow)`` over grouped operands.

    Shapes: xq (G, M, K), wq (G, Og, K); zw, sw, ow (G, 1, Og). The activation offset is
    handled by the callers because its correction depends on padding.
    """
    acc = _int_acc(xq, zx, wq, zw).to(torch.float64)
    sum_a = (xq.sum(-1, keepdim=True) - xq.shape[-1] * zx).to(torch.float64)  # sum_k (xq - zx)
    return sx * (sw * acc + ow * sum_a)


def int_linear(
    x_idx: torch.Tensor,
    x_scale: Scalar,
    x_zero: Scalar,
    w_idx: torch.Tensor,
    w_scale: Scalar,
    w_zero: Scalar,
    bias: torch.Tensor | None = None,
    *,
    x_offset: Scalar = 0.0,
    w_offset: Scalar = 0.0,
    mult: Scalar | None = None,
    add: Scalar | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniform-mode linear layer on integer activations and integer weights.

    Dequantized operands (never materialised)::

        x[n, k] = x_scale * (x_idx[n, k] - x_zero) + x_offset                (per tensor)
        w[o, k] = w_scale[o] * (w_idx[o, k] - w_zero[o]) + w_offset[o]       (per tensor/channel)

    Result::

        out[n, o] = (sum_k x[n, k] * w[o, k] + bias[o]) * mult[o] + add[o]

    computed as an exact integer GEMM of the indices with gemmlowp zero-point corrections
    (:func:`int_gemm`), after which the scale product, offset terms, bias and the
    per-output-channel epilogue ``acc * mult + add`` (e.g. a folded BatchNorm) are applied in
    float64, once per output. The result is cast to ``out_dtype``.

    Args:
        x_idx: (*, K) integer activation indices.
        x_scale: Per-tensor activation scale.
        x_zero: Per-tensor integer activation zero point.
        w_idx: (O, K) integer weight indices.
        w_scale: Weight scale, scalar or (O,).
        w_zero: Integer weight zero point, scalar or (O,).
        bias: Optional float (O,) bias, added before the epilogue.
        x_offset: Per-tensor float activation offset (generic grid ``offset + scale * idx``).
        w_offset: Float weight offset, scalar or (O,).
        mult: Optional epilogue multiplier, scalar or (O,).
        add: Optional epilogue addend, scalar or (O,).
        out_dtype: Floating dtype of the result.

    Returns:
        (*, O) tensor of dtype ``out_dtype``.

    Raises:
        ValueError: on non-integer indices, mismatched shapes or non-integer zero points.

    Example:
        >>> x_idx = torch.tensor([[3, 0, 1]], dtype=torch.uint8)  # x = 0.5 * (idx - 1)
        >>> w_idx = torch.tensor([[0, 1, 2], [3, 3, 3]], dtype=torch.uint8)  # w = 0.25*(idx-2)
        >>> int_linear(x_idx, 0.5, 1, w_idx, 0.25, 2)
        tensor([[-0.3750,  0.1250]])
    """
    x_idx, w_idx, o, k = check_int_operands(x_idx, w_idx)
    dev = w_idx.device
    sx = scalar_float(x_scale, "x_scale")
    zx = scalar_int(x_zero, "x_zero")
    ox = scalar_float(x_offset, "x_offset")
    sw = float_param(w_scale, o, "w_scale", dev, 1.0)
    zw = int_param(w_zero, o, "w_zero", dev)
    ow = float_param(w_offset, o, "w_offset", dev, 0.0)

    xq = x_idx.reshape(1, math.prod(x_idx.shape[:-1]), k).to(torch.int64)
    wq = w_idx.to(torch.int64).unsqueeze(0)
    y = _int_real(xq, zx, sx, wq, zw.view(1, 1, o), sw.view(1, 1, o), ow.view(1, 1, o))[0]
    if ox != 0.0:
        # Without padding every k is present, so the offset term is ox * sum_k w[o, k].
        w_sum = sw * (w_idx.to(torch.int64).sum(-1) - k * zw).to(torch.float64) + k * ow
        y = y + ox * w_sum
    y = epilogue(y, bias, mult, add, o)
    return y.to(out_dtype).reshape(*x_idx.shape[:-1], o)


def int_conv2d(
    x_idx: torch.Tensor,
    x_scale: Scalar,
    x_zero: Scalar,
    w_idx: torch.Tensor,
    w_scale: Scalar,
    w_zero: Scalar,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    x_offset: Scalar = 0.0,
    w_offset: Scalar = 0.0,
    mult: Scalar | None = None,
    add: Scalar | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniform-mode conv2d on integer activations and weights (im2col + :func:`int_linear` math).

    Computes ``(F.conv2d(x, w, None, stride, padding, dilation, groups) + bias) * mult + add``
    per output channel, with ``x`` and ``w`` the dequantized operands defined in
    :func:`int_linear`. Zero padding is zero in the *real* domain: the index tensor is padded
    with ``x_zero`` (whose real value is ``x_offset``), and when ``x_offset != 0`` the offset
    contribution of padded taps is removed exactly using the im2col validity mask.

    Args:
        x_idx: (N, C, H, W) integer activation indices.
        x_scale: Per-tensor activation scale.
        x_zero: Per-tensor integer activation zero point.
        w_idx: (O, C / groups, kH, kW) integer weight indices.
        w_scale: Weight scale, scalar or (O,).
        w_zero: Integer weight zero point, scalar or (O,).
        bias: Optional float (O,) bias.
        stride: Conv stride (int or pair).
        padding: Zero padding (int or pair).
        dilation: Dilation (int or pair).
        groups: Number of groups (``groups == C == O`` is depthwise).
        x_offset: Per-tensor float activation offset.
        w_offset: Float weight offset, scalar or (O,).
        mult: Optional epilogue multiplier, scalar or (O,).
        add: Optional epilogue addend, scalar or (O,).
        out_dtype: Floating dtype of the result.

    Returns:
        (N, O, H_out, W_out) tensor of dtype ``out_dtype``.

    Example:
        >>> x_idx = torch.randint(0, 16, (2, 4, 5, 5), dtype=torch.uint8)
        >>> w_idx = torch.randint(0, 16, (4, 1, 3, 3), dtype=torch.uint8)
        >>> int_conv2d(x_idx, 0.1, 0, w_idx, 0.02, 8, padding=1, groups=4).shape  # depthwise
        torch.Size([2, 4, 5, 5])
    """
    x_idx = check_int_tensor(x_idx, "x_idx")
    w_idx = check_int_tensor(w_idx, "w_idx")
    geom = ConvGeom(x_idx.shape, w_idx.shape, stride, padding, dilation, groups)
    o, g = geom.o, geom.groups
    og = o // g
    dev = w_idx.device
    sx = scalar_float(x_scale, "x_scale")
    zx = scalar_int(x_zero, "x_zero")
    ox = scalar_float(x_offset, "x_offset")
    sw = float_param(w_scale, o, "w_scale", dev, 1.0)
    zw = int_param(w_zero, o, "w_zero", dev)
    ow = float_param(w_offset, o, "w_offset", dev, 0.0)

    # unfold needs a float input; float64 holds the indices exactly. Padding with the zero
    # point makes padded taps contribute (zx - zx) = 0 to the centred integer product.
    _check_exact_f64(x_idx)
    cols = geom.im2col(x_idx.to(torch.float64), pad_value=float(zx)).to(torch.int64)
    wq = w_idx.to(torch.int64).reshape(g, og, geom.kg)
    y = _int_real(cols, zx, sx, wq, zw.view(g, 1, og), sw.view(g, 1, og), ow.view(g, 1, og))
    y = y.permute(1, 0, 2).reshape(-1, o)  # (N * L, O), channel o = g * Og + j
    if ox != 0.0:
        # Offset term ox * sum over *valid* taps of w[o, tap]: sum w over the channels of each
        # kernel position, then contract with the per-location validity mask.
        w_real = sw.view(o, 1) * (w_idx.reshape(o, -1).to(torch.int64) - zw.view(o, 1)).to(
            torch.float64
        ) + ow.view(o, 1)
        w_tap = w_real.view(o, -1, geom.kernel[0] * geom.kernel[1]).sum(1)  # (O, kH*kW)
        corr = ox * (geom.valid_mask(dev) @ w_tap.transpose(0, 1))  # (L, O)
        y = (y.view(geom.n, -1, o) + corr).view(-1, o)
    y = epilogue(y, bias, mult, add, o)
    return geom.to_nchw(y).to(out_dtype)


def _check_exact_f64(t: torch.Tensor) -> None:
    if t.numel() and int(t.abs().max()) >= F64_EXACT:
        raise ValueError("x_idx values are too large to be handled exactly (|idx| >= 2**53)")
