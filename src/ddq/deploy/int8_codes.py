"""Adaptive (non-uniform) weights onto per-channel int8 grids: the int8 fast path.

A DDQ adaptive layer stores ``b``-bit indices into a table of ``2**b`` learned levels,
times one scale per output channel. Integer runtimes (ONNX Runtime's ``QLinearConv``,
TensorRT, ...) want int8 weights with one scale per channel instead. Because the table is
shared by all channels and the channel scale factors out, one int8 code per *level* does
it: ``code[k] = round(127 * levels[k] / L)`` with ``L = max |levels|``, and channel ``c``'s
int8 scale is ``channel_scale[c] * L / 127``. The weight becomes ``code[idx]`` (int8), the
artifact keeps its ``b``-bit indices, and the only loss is each level's rounding onto the
127-step grid (at most ``L / 254`` per level, before the channel scale). Levels trained on
that grid (``QuantizerConfig.level_grid=8``, which the ``int8`` preset sets; see
``ddq.quantizer.snap_to_grid``) lose nothing: they are ``code * L / 127`` already, so
``relative_rmse`` is float rounding (below 1e-6) and the int8 graph runs the trained
weights.

Example:
    >>> import torch
    >>> w = adaptive_to_int8(torch.tensor([-1.0, -0.3, 0.2, 1.0]), torch.tensor([[0, 3], [1, 2]]),
    ...                      torch.tensor([0.5, 2.0]))
    >>> w.codes.tolist(), w.level_codes.tolist()
    ([[-127, 127], [-38, 25]], [-127, -38, 25, 127])
    >>> round(w.relative_rmse, 4)
    0.0064
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .freeze import decode_weight

__all__ = ["Int8Weights", "adaptive_to_int8"]

INT8_MAX = 127  # symmetric: -127..127, so the zero point is 0 and ORT's kernels apply


@dataclass(frozen=True)
class Int8Weights:
    """One layer's adaptive weights on per-channel int8 grids.

    Attributes:
        codes: int8, the weight's shape: ``level_codes[idx]``.
        scale: float32, one per output channel (length 1 for a per-tensor layer).
        level_codes: int8, one per table level.
        relative_rmse: ``||int8 weights - adaptive weights|| / ||adaptive weights||`` over
            the layer's actual weights (0 when the weights are all zero).
        max_level_error: the largest ``|level - code * L / 127|`` in units of one int8
            step (at most 0.5).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    level_codes: torch.Tensor
    relative_rmse: float
    max_level_error: float

    def dequantize(self) -> torch.Tensor:
        """The float weight the int8 form stands for (``codes * scale`` on axis 0)."""
        shape = (-1, *([1] * (self.codes.dim() - 1)))
        return self.codes.float() * self.scale.view(shape)


def adaptive_to_int8(
    table: torch.Tensor, idx: torch.Tensor, channel_scales: torch.Tensor | None = None
) -> Int8Weights:
    """Map a layer's learned levels onto per-channel int8 grids (see the module docstring).

    Args:
        table: the ``2**b`` levels (float).
        idx: the weight's level indices (any integer dtype; the weight's shape, output
            channels first).
        channel_scales: one scale per output channel, or ``None`` for a per-tensor layer.
    """
    table = table.detach().float().cpu()
    idx = idx.detach().long().cpu()
    if table.dim() != 1 or table.numel() < 2:
        raise ValueError(
            f"expected a 1-D table of at least 2 levels, got shape {tuple(table.shape)}"
        )
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= table.numel()):
        raise ValueError(f"indices out of range for a table of {table.numel()} levels")
    peak = float(table.abs().max())
    step = peak / INT8_MAX if peak > 0 else 1.0
    level_codes = torch.round(table / step).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    level_error = float((table - level_codes.float() * step).abs().max()) / step
    if channel_scales is None:
        scale = torch.tensor([step], dtype=torch.float32)
        ch = None
    else:
        ch = channel_scales.detach().float().cpu()
        if ch.numel() != idx.shape[0]:
            raise ValueError(
                f"{ch.numel()} channel scales for a weight of {idx.shape[0]} output channels"
            )
        scale = (ch * step).to(torch.float32)
    codes = level_codes[idx]
    adaptive = decode_weight(table, idx, ch)
    mapped = decode_weight(level_codes.float(), idx, scale)
    norm = float(adaptive.norm())
    rel = float((mapped - adaptive).norm()) / norm if norm > 0 else 0.0
    return Int8Weights(codes, scale, level_codes, rel, level_error)
