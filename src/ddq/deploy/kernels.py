"""Reference low-precision linear / conv2d kernels for exported DDQ models, in plain PyTorch.

These kernels define *what* an integer or look-up-table deployment computes; they are written
for clarity and exactness, not speed, and serve as the oracle for faster backends.

Two weight representations come out of DDQ training:

* **uniform** (integer grid): ``value = scale * (idx - zero) + offset`` with an integer
  ``zero`` point (``2**(b-1)`` for signed, ``0`` for unsigned grids) and an optional float
  ``offset`` (``offset + scale * idx`` is the generic case: ``zero = 0``). Activations use the
  same form with per-tensor parameters. :func:`int_linear` / :func:`int_conv2d` multiply the raw
  indices in exact integer arithmetic and apply the zero-point corrections afterwards
  (gemmlowp)::

      sum_k (xq - zx)(wq - zw) = sum_k xq*wq - zw*sum_k xq - zx*sum_k wq + K*zx*zw

  so the inner loop is a plain unsigned-index GEMM; the scales, offsets, bias and a
  per-output-channel epilogue ``out = acc * mult + add`` (a BatchNorm folded after the layer)
  are applied once per output.

* **adaptive** (look-up table): ``W[o, k] = table[w_idx[o, k]] * w_scale[o]`` with ``2**b``
  learned levels, shared (``table`` of shape ``(L,)``) or per output channel (``(O, L)``), and
  an optional per-output-channel scale ``w_scale`` (DDQ's per-channel weights: one normalised
  table per layer times one scale per channel). :func:`lut_linear` / :func:`lut_conv2d` first
  add every activation into the bucket of its weight's index, then do only ``L`` multiplies
  per output, then one multiply by the channel scale, which factors out of the sum::

      y[n, o] = w_scale[o] * sum_m table[o, m] * (sum_{k : w_idx[o, k] == m} x[n, k])

  Per-channel *uniform* weights need no extra argument: their integer step per channel is
  the ``(O,)`` ``w_scale`` of :func:`int_linear` / :func:`int_conv2d`.

Conv2d is lowered to the linear kernels with ``torch.nn.functional.unfold`` (im2col), one
independent GEMM per group (all groups are batched together, so depthwise convs do not loop
in Python).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "int_conv2d",
    "int_gemm",
    "int_linear",
    "lut_conv2d",
    "lut_linear",
]

Scalar = int | float | torch.Tensor
_IntPair = int | tuple[int, int]

# float64 holds every integer up to 2**53 exactly, so a float64 GEMM of integer operands is
# exact as long as every partial sum is below that (BLAS-fast, and also works on CUDA).
_F64_EXACT = 2**53
_DEFAULT_CHUNK = 1 << 22


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------


def _check_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_int_tensor(t: object, name: str) -> torch.Tensor:
    t = _check_tensor(t, name)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype (quantization indices), got {t.dtype}")
    return t


def _check_float_tensor(t: object, name: str) -> torch.Tensor:
    t = _check_tensor(t, name)
    if not t.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {t.dtype}")
    return t


def _as_tensor(value: Scalar, device: torch.device | None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value if device is None else value.to(device)
    # Python floats are doubles; torch.as_tensor would round them to the float32 default dtype.
    return torch.as_tensor(value, dtype=torch.float64, device=device)


def _float_param(
    value: Scalar | None, size: int, name: str, device: torch.device, default: float
) -> torch.Tensor:
    """Scalar or per-output-channel float parameter -> float64 tensor of shape (size,)."""
    if value is None:
        value = default
    t = _as_tensor(value, device)
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    return _per_channel(t, torch.float64, size, name)


def _int_param(value: Scalar, size: int, name: str, device: torch.device) -> torch.Tensor:
    """Scalar or per-output-channel integer zero point -> int64 tensor of shape (size,)."""
    t = _as_tensor(value, device)
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer zero point, got dtype {t.dtype}")
    # Zero points saved as floats are fine as long as they are whole numbers; a fractional
    # shift cannot be folded into an integer GEMM and belongs in the float offset.
    if t.is_floating_point() and not bool(torch.all(t == torch.round(t))):
        raise ValueError(
            f"{name} must be integer-valued; pass a fractional shift as the offset instead"
        )
    return _per_channel(t, torch.int64, size, name)


def _check_int_operands(
    x_idx: torch.Tensor, w_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Validate integer activation/weight index operands; return them with ``(O, K)``."""
    x_idx = _check_int_tensor(x_idx, "x_idx")
    w_idx = _check_int_tensor(w_idx, "w_idx")
    if w_idx.dim() != 2:
        raise ValueError(f"w_idx must be 2-D (out_features, in_features), got {w_idx.dim()}-D")
    o, k = w_idx.shape
    if x_idx.dim() < 1 or x_idx.shape[-1] != k:
        raise ValueError(
            f"x_idx last dimension must equal w_idx in_features={k}, got shape {tuple(x_idx.shape)}"
        )
    return x_idx, w_idx, o, k


def _per_channel(t: torch.Tensor, dtype: torch.dtype, size: int, name: str) -> torch.Tensor:
    """``t`` as a ``(size,)`` tensor of ``dtype``: a scalar broadcasts, else one per channel."""
    flat = t.to(dtype).reshape(-1)
    if flat.numel() == 1:
        return flat.expand(size)
    if flat.numel() != size:
        raise ValueError(
            f"{name} must be a scalar or have {size} elements (one per output channel), "
            f"got shape {tuple(t.shape)}"
        )
    return flat


def _scalar_float(value: Scalar, name: str) -> float:
    t = _as_tensor(value, None)
    if t.numel() != 1:
        raise ValueError(f"{name} must be a per-tensor scalar, got shape {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    return float(t)


def _scalar_int(value: Scalar, name: str) -> int:
    t = _as_tensor(value, None)
    if t.numel() != 1:
        raise ValueError(f"{name} must be a per-tensor scalar, got shape {tuple(t.shape)}")
    return int(_int_param(t, 1, name, t.device)[0])


def _pair(value: _IntPair, name: str, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# integer (uniform-grid) kernels
# ---------------------------------------------------------------------------------------------


def _exact_int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int64 ``a @ b`` for int64 operands (batched like ``torch.matmul``)."""
    k = a.shape[-1]
    bound = 0
    if a.numel() and b.numel():
        bound = int(a.abs().max()) * int(b.abs().max()) * k
    if bound < _F64_EXACT:
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
    x_idx, w_idx, o, k = _check_int_operands(x_idx, w_idx)
    zx = _scalar_int(x_zero, "x_zero")
    zw = _int_param(w_zero, o, "w_zero", w_idx.device)
    xq = x_idx.reshape(1, math.prod(x_idx.shape[:-1]), k).to(torch.int64)
    acc = _int_acc(xq, zx, w_idx.to(torch.int64).unsqueeze(0), zw.view(1, 1, o))
    return acc.reshape(*x_idx.shape[:-1], o)


def _epilogue(
    y: torch.Tensor,
    bias: torch.Tensor | None,
    mult: Scalar | None,
    add: Scalar | None,
    o: int,
) -> torch.Tensor:
    """``(y + bias) * mult + add`` with per-output-channel vectors broadcast over y's last dim."""
    if bias is not None:
        bias = _check_float_tensor(bias, "bias")
        if bias.shape != (o,):
            raise ValueError(f"bias must have shape ({o},), got {tuple(bias.shape)}")
        y = y + bias.to(y.dtype)
    if mult is not None:
        y = y * _float_param(mult, o, "mult", y.device, 1.0).to(y.dtype)
    if add is not None:
        y = y + _float_param(add, o, "add", y.device, 0.0).to(y.dtype)
    return y


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
    x_idx, w_idx, o, k = _check_int_operands(x_idx, w_idx)
    dev = w_idx.device
    sx = _scalar_float(x_scale, "x_scale")
    zx = _scalar_int(x_zero, "x_zero")
    ox = _scalar_float(x_offset, "x_offset")
    sw = _float_param(w_scale, o, "w_scale", dev, 1.0)
    zw = _int_param(w_zero, o, "w_zero", dev)
    ow = _float_param(w_offset, o, "w_offset", dev, 0.0)

    xq = x_idx.reshape(1, math.prod(x_idx.shape[:-1]), k).to(torch.int64)
    wq = w_idx.to(torch.int64).unsqueeze(0)
    y = _int_real(xq, zx, sx, wq, zw.view(1, 1, o), sw.view(1, 1, o), ow.view(1, 1, o))[0]
    if ox != 0.0:
        # Without padding every k is present, so the offset term is ox * sum_k w[o, k].
        w_sum = sw * (w_idx.to(torch.int64).sum(-1) - k * zw).to(torch.float64) + k * ow
        y = y + ox * w_sum
    y = _epilogue(y, bias, mult, add, o)
    return y.to(out_dtype).reshape(*x_idx.shape[:-1], o)


# ---------------------------------------------------------------------------------------------
# look-up-table (adaptive) kernels
# ---------------------------------------------------------------------------------------------


def _lut_core(
    x: torch.Tensor, w_idx: torch.Tensor, table: torch.Tensor, max_chunk_elements: int
) -> torch.Tensor:
    """Grouped bucketed LUT product.

    Args:
        x: (G, M, K) activations (one im2col matrix per group), in the compute dtype.
        w_idx: (G, Og, K) int64 indices into the table.
        table: (L,) shared or (G, Og, L) per-output-channel levels, in the compute dtype.
        max_chunk_elements: Bound on the elements of the (G, M, Og, L) accumulator chunks.

    Returns:
        (G, M, Og) outputs.
    """
    g, m, k = x.shape
    og = w_idx.shape[1]
    levels = table.shape[-1]
    out = torch.empty((g, m, og), dtype=table.dtype, device=x.device)
    if out.numel() == 0:
        return out
    # Chunk sizes: keep whole output rows first (fewer, larger scatter calls are much faster),
    # then whole groups, then split the activations so that gc * mc * oc * L <= budget.
    oc = min(og, max(1, max_chunk_elements // levels))
    gc = min(g, max(1, max_chunk_elements // (oc * levels)))
    mc = min(m, max(1, max_chunk_elements // (gc * oc * levels)))
    for g0 in range(0, g, gc):
        g1 = min(g, g0 + gc)
        for o0 in range(0, og, oc):
            o1 = min(og, o0 + oc)
            idx = w_idx[g0:g1, o0:o1].unsqueeze(1)  # (gc, 1, oc, K)
            # Shared (L,) table, or this chunk's per-channel rows as (gc, 1, oc, L).
            tab = table if table.dim() == 1 else table[g0:g1, o0:o1].unsqueeze(1)
            for m0 in range(0, m, mc):
                m1 = min(m, m0 + mc)
                shape = (g1 - g0, m1 - m0, o1 - o0, k)
                # Bucketed accumulation: acc[g, n, o, w_idx[g, o, k]] += x[g, n, k]. Index and
                # source are stride-0 broadcast views, so nothing of size N*O*K is materialised.
                src = x[g0:g1, m0:m1].unsqueeze(2).expand(shape)
                acc = torch.zeros((*shape[:-1], levels), dtype=table.dtype, device=x.device)
                acc.scatter_add_(3, idx.expand(shape), src)
                # Then only L multiplies per output.
                y = torch.matmul(acc, tab) if table.dim() == 1 else (acc * tab).sum(-1)
                out[g0:g1, m0:m1, o0:o1] = y
    return out


def _check_lut_args(
    w_idx: torch.Tensor, table: torch.Tensor, o: int, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    table = _check_float_tensor(table, "table")
    if table.dim() not in (1, 2) or (table.dim() == 2 and table.shape[0] != o):
        raise ValueError(
            f"table must have shape (L,) (shared) or ({o}, L) (per output channel), "
            f"got {tuple(table.shape)}"
        )
    levels = table.shape[-1]
    if levels == 0:
        raise ValueError("table must have at least one level")
    if w_idx.numel():
        lo, hi = int(w_idx.min()), int(w_idx.max())
        if lo < 0 or hi >= levels:
            raise ValueError(
                f"w_idx values must lie in [0, {levels}) for a table of {levels} levels, "
                f"got values in [{lo}, {hi}]"
            )
    dtype = torch.promote_types(x.dtype, table.dtype)
    return w_idx.to(torch.int64), table.to(dtype)


def _channel_scale(y: torch.Tensor, w_scale: Scalar | None, o: int) -> torch.Tensor:
    """``y * w_scale[o]`` over the last dimension (in ``y``'s dtype), or ``y`` unchanged."""
    if w_scale is None:
        return y
    scale = _float_param(w_scale, o, "w_scale", y.device, 1.0)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("w_scale must be finite")
    return y * scale.to(y.dtype)


def lut_linear(
    x: torch.Tensor,
    w_idx: torch.Tensor,
    table: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    w_scale: Scalar | None = None,
    mult: Scalar | None = None,
    add: Scalar | None = None,
    max_chunk_elements: int = _DEFAULT_CHUNK,
) -> torch.Tensor:
    """Adaptive-mode (look-up table) linear layer with bucketed accumulation.

    With ``W[o, k] = table[o, w_idx[o, k]] * w_scale[o]`` (``table[w_idx[o, k]]`` for a shared
    table; ``w_scale`` 1 when not given)::

        acc[n, o, m] = sum_{k : w_idx[o, k] == m} x[n, k]        (additions only)
        out[n, o]    = (w_scale[o] * sum_m table[o, m] * acc[n, o, m] + bias[o]) * mult[o] + add[o]

    Cost model for N rows, O outputs, K inputs and L = 2**b levels: ``N*O*K`` additions into
    the buckets plus ``N*O*L`` multiply-adds, versus ``N*O*K`` multiply-adds for a dense GEMM;
    so multiplies drop by a factor ``K / L`` (e.g. 4-bit weights, K = 576: 36x fewer), while
    additions stay the same (plus ``O*K*b`` bits of weight storage and an ``L``-entry table).
    Here the buckets are filled by one ``scatter_add_`` into an (N, O, L) accumulator whose
    index and source are broadcast views (no N*O*K temporary); the accumulator is chunked over
    O and then N so that it never exceeds ``max_chunk_elements`` elements, which bounds memory
    independently of the layer size.

    Args:
        x: (*, K) float activations.
        w_idx: (O, K) integer weight indices in ``[0, L)``.
        table: (L,) shared levels or (O, L) per-output-channel levels (float).
        bias: Optional float (O,) bias, added before the epilogue.
        w_scale: Optional weight scale, scalar or (O,) (per-channel weights), applied to
            each output's bucketed sum in the compute dtype, before the bias.
        mult: Optional epilogue multiplier, scalar or (O,).
        add: Optional epilogue addend, scalar or (O,).
        max_chunk_elements: Memory bound for the chunked temporaries (elements).

    Returns:
        (*, O) tensor in the promoted dtype of ``x`` and ``table``.

    Raises:
        ValueError: on mismatched shapes or dtypes, or indices outside the table.

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 3.0]])
        >>> w_idx = torch.tensor([[0, 1, 1], [2, 2, 0]])
        >>> lut_linear(x, w_idx, torch.tensor([-1.0, 0.5, 2.0]))  # [-1 + 0.5*5, 2*3 - 3]
        tensor([[1.5000, 3.0000]])
        >>> lut_linear(x, w_idx, torch.tensor([-1.0, 0.5, 2.0]), w_scale=torch.tensor([2.0, 0.5]))
        tensor([[3.0000, 1.5000]])
    """
    x = _check_float_tensor(x, "x")
    w_idx = _check_int_tensor(w_idx, "w_idx")
    if w_idx.dim() != 2:
        raise ValueError(f"w_idx must be 2-D (out_features, in_features), got {w_idx.dim()}-D")
    o, k = w_idx.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"x last dimension must equal w_idx in_features={k}, got shape {tuple(x.shape)}"
        )
    if max_chunk_elements < 1:
        raise ValueError(f"max_chunk_elements must be >= 1, got {max_chunk_elements}")
    idx, table = _check_lut_args(w_idx, table, o, x)
    xg = x.to(table.dtype).reshape(1, math.prod(x.shape[:-1]), k)
    tab = table if table.dim() == 1 else table.unsqueeze(0)
    y = _lut_core(xg, idx.unsqueeze(0), tab, max_chunk_elements)[0]
    y = _epilogue(_channel_scale(y, w_scale, o), bias, mult, add, o)
    return y.reshape(*x.shape[:-1], o)


# ---------------------------------------------------------------------------------------------
# conv2d via im2col
# ---------------------------------------------------------------------------------------------


class _ConvGeom:
    """Validated conv2d geometry shared by the int and LUT convs."""

    def __init__(
        self,
        x_shape: torch.Size,
        w_shape: torch.Size,
        stride: _IntPair,
        padding: _IntPair,
        dilation: _IntPair,
        groups: int,
    ) -> None:
        if len(x_shape) != 4:
            raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(x_shape)}")
        if len(w_shape) != 4:
            raise ValueError(f"w_idx must be 4-D (O, C/groups, kH, kW), got shape {tuple(w_shape)}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        n, c, h, w = x_shape
        o, cg, kh, kw = w_shape
        if c % groups or o % groups:
            raise ValueError(
                f"in_channels={c} and out_channels={o} must both be divisible by groups={groups}"
            )
        if cg * groups != c:
            raise ValueError(
                f"w_idx has {cg} input channels per group but input has {c} channels and "
                f"groups={groups} (expected {c // groups})"
            )
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)
        self.kernel = (kh, kw)
        sh, sw = self.stride
        ph, pw = self.padding
        dh, dw = self.dilation
        self.h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        self.w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if self.h_out < 1 or self.w_out < 1:
            raise ValueError(
                f"kernel {kh}x{kw} (dilation {self.dilation}) does not fit the padded input "
                f"{h + 2 * ph}x{w + 2 * pw}"
            )
        self.n, self.c, self.o, self.groups = n, c, o, groups
        self.h_in, self.w_in = h, w
        self.kg = cg * kh * kw

    def im2col(self, x: torch.Tensor, pad_value: float = 0.0) -> torch.Tensor:
        """(N, C, H, W) float -> (G, N * L, Cg * kH * kW) patches, padded with ``pad_value``."""
        ph, pw = self.padding
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph), value=pad_value)
        cols = F.unfold(x, self.kernel, dilation=self.dilation, stride=self.stride)
        # unfold orders the patch dimension as (channel, kh, kw) with channel slowest, so the
        # channels of group g are the contiguous slice g*Cg*kH*kW ... and match w_idx's layout.
        n, l_out = cols.shape[0], cols.shape[-1]
        cols = cols.view(n, self.groups, self.kg, l_out)
        return cols.permute(1, 0, 3, 2).reshape(self.groups, n * l_out, self.kg)

    def valid_mask(self, device: torch.device) -> torch.Tensor:
        """(L, kH*kW) float64: 1 where the kernel tap reads the input, 0 where it reads padding."""
        ones = torch.ones((1, 1, self.h_in, self.w_in), dtype=torch.float64, device=device)
        mask = F.unfold(
            ones, self.kernel, dilation=self.dilation, padding=self.padding, stride=self.stride
        )
        return mask[0].transpose(0, 1)

    def to_nchw(self, y: torch.Tensor) -> torch.Tensor:
        """(N * L, O) -> (N, O, H_out, W_out)."""
        y = y.view(self.n, self.h_out * self.w_out, self.o).permute(0, 2, 1)
        return y.reshape(self.n, self.o, self.h_out, self.w_out).contiguous()


def int_conv2d(
    x_idx: torch.Tensor,
    x_scale: Scalar,
    x_zero: Scalar,
    w_idx: torch.Tensor,
    w_scale: Scalar,
    w_zero: Scalar,
    bias: torch.Tensor | None = None,
    stride: _IntPair = 1,
    padding: _IntPair = 0,
    dilation: _IntPair = 1,
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
    x_idx = _check_int_tensor(x_idx, "x_idx")
    w_idx = _check_int_tensor(w_idx, "w_idx")
    geom = _ConvGeom(x_idx.shape, w_idx.shape, stride, padding, dilation, groups)
    o, g = geom.o, geom.groups
    og = o // g
    dev = w_idx.device
    sx = _scalar_float(x_scale, "x_scale")
    zx = _scalar_int(x_zero, "x_zero")
    ox = _scalar_float(x_offset, "x_offset")
    sw = _float_param(w_scale, o, "w_scale", dev, 1.0)
    zw = _int_param(w_zero, o, "w_zero", dev)
    ow = _float_param(w_offset, o, "w_offset", dev, 0.0)

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
    y = _epilogue(y, bias, mult, add, o)
    return geom.to_nchw(y).to(out_dtype)


def _check_exact_f64(t: torch.Tensor) -> None:
    if t.numel() and int(t.abs().max()) >= _F64_EXACT:
        raise ValueError("x_idx values are too large to be handled exactly (|idx| >= 2**53)")


def lut_conv2d(
    x: torch.Tensor,
    w_idx: torch.Tensor,
    table: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: _IntPair = 1,
    padding: _IntPair = 0,
    dilation: _IntPair = 1,
    groups: int = 1,
    *,
    w_scale: Scalar | None = None,
    mult: Scalar | None = None,
    add: Scalar | None = None,
    max_chunk_elements: int = _DEFAULT_CHUNK,
) -> torch.Tensor:
    """Adaptive-mode conv2d: ``F.conv2d`` with weights ``table[w_idx]`` (times ``w_scale[o]``
    for per-channel weights), via im2col buckets.

    Each group's im2col matrix goes through the bucketed accumulation of :func:`lut_linear`
    (cost ``N*L_out*O*Kg`` additions + ``N*L_out*O*2**b`` multiply-adds, Kg = C/groups*kH*kW).
    A per-channel table row ``o`` belongs to output channel ``o`` (group ``o // (O/groups)``).

    Args:
        x: (N, C, H, W) float activations.
        w_idx: (O, C / groups, kH, kW) integer weight indices in ``[0, L)``.
        table: (L,) shared or (O, L) per-output-channel levels.
        bias: Optional float (O,) bias.
        stride: Conv stride (int or pair).
        padding: Zero padding (int or pair).
        dilation: Dilation (int or pair).
        groups: Number of groups (``groups == C == O`` is depthwise).
        w_scale: Optional weight scale, scalar or (O,) (per-channel weights), applied to
            each output's bucketed sum before the bias.
        mult: Optional epilogue multiplier, scalar or (O,).
        add: Optional epilogue addend, scalar or (O,).
        max_chunk_elements: Memory bound for the chunked temporaries (elements).

    Returns:
        (N, O, H_out, W_out) tensor in the promoted dtype of ``x`` and ``table``.

    Example:
        >>> x = torch.randn(1, 3, 8, 8)
        >>> w_idx = torch.randint(0, 4, (6, 3, 3, 3))
        >>> table = torch.tensor([-0.3, -0.1, 0.1, 0.3])
        >>> y = lut_conv2d(x, w_idx, table, stride=2, padding=1)
        >>> torch.allclose(y, F.conv2d(x, table[w_idx], stride=2, padding=1), atol=1e-5)
        True
    """
    x = _check_float_tensor(x, "x")
    w_idx = _check_int_tensor(w_idx, "w_idx")
    geom = _ConvGeom(x.shape, w_idx.shape, stride, padding, dilation, groups)
    if max_chunk_elements < 1:
        raise ValueError(f"max_chunk_elements must be >= 1, got {max_chunk_elements}")
    o = geom.o
    idx, table = _check_lut_args(w_idx, table, o, x)
    cols = geom.im2col(x.to(table.dtype))
    g = geom.groups
    og = o // g
    tab = table if table.dim() == 1 else table.view(g, og, -1)
    y = _lut_core(cols, idx.reshape(g, og, geom.kg), tab, max_chunk_elements)
    y = y.permute(1, 0, 2).reshape(-1, o)  # (N * L, O), channel o = g * Og + j
    y = _epilogue(_channel_scale(y, w_scale, o), bias, mult, add, o)
    return geom.to_nchw(y)
