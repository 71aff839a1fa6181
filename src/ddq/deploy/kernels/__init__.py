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

Files: :mod:`.integer` (integer GEMM family), :mod:`.lut` (table-lookup family),
:mod:`.im2col` (the conv lowering both use), :mod:`.common` (validation, epilogue).

Conv2d is lowered to the linear kernels with ``torch.nn.functional.unfold`` (im2col), one
independent GEMM per group (all groups are batched together, so depthwise convs do not loop
in Python).
"""

from __future__ import annotations

from .integer import int_conv2d, int_gemm, int_linear
from .lut import lut_conv2d, lut_linear

__all__ = [
    "int_conv2d",
    "int_gemm",
    "int_linear",
    "lut_conv2d",
    "lut_linear",
]
