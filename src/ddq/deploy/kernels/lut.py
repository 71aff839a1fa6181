"""Look-up-table (adaptive) kernels: bucketed accumulation, then ``2**b`` multiplies.

``lut_linear`` and ``lut_conv2d`` add every activation into the bucket of its weight's
index, then multiply each bucket by its level (see :mod:`ddq.deploy.kernels`).
"""

from __future__ import annotations

import math

import torch

from .common import (
    DEFAULT_CHUNK,
    IntPair,
    Scalar,
    check_float_tensor,
    check_int_tensor,
    check_linear_shapes,
    epilogue,
    float_param,
)
from .im2col import ConvGeom

__all__ = ["lut_conv2d", "lut_linear"]


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
    table = check_float_tensor(table, "table")
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
    scale = float_param(w_scale, o, "w_scale", y.device, 1.0)
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
    max_chunk_elements: int = DEFAULT_CHUNK,
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
    x = check_float_tensor(x, "x")
    w_idx = check_int_tensor(w_idx, "w_idx")
    o, k = check_linear_shapes(x, w_idx, "x")
    if max_chunk_elements < 1:
        raise ValueError(f"max_chunk_elements must be >= 1, got {max_chunk_elements}")
    idx, table = _check_lut_args(w_idx, table, o, x)
    xg = x.to(table.dtype).reshape(1, math.prod(x.shape[:-1]), k)
    tab = table if table.dim() == 1 else table.unsqueeze(0)
    y = _lut_core(xg, idx.unsqueeze(0), tab, max_chunk_elements)[0]
    y = epilogue(_channel_scale(y, w_scale, o), bias, mult, add, o)
    return y.reshape(*x.shape[:-1], o)


def lut_conv2d(
    x: torch.Tensor,
    w_idx: torch.Tensor,
    table: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    w_scale: Scalar | None = None,
    mult: Scalar | None = None,
    add: Scalar | None = None,
    max_chunk_elements: int = DEFAULT_CHUNK,
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
        >>> torch.allclose(y, torch.conv2d(x, table[w_idx], stride=2, padding=1), atol=1e-5)
        True
    """
    x = check_float_tensor(x, "x")
    w_idx = check_int_tensor(w_idx, "w_idx")
    geom = ConvGeom(x.shape, w_idx.shape, stride, padding, dilation, groups)
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
    y = epilogue(_channel_scale(y, w_scale, o), bias, mult, add, o)
    return geom.to_nchw(y)
