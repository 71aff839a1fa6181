"""The quantizer's forward and custom backward: nearest-fine-level index, table lookup.

Forward: ``y = v[i(x)]`` where ``i(x)`` is the index of the fine level nearest to ``x``
(clamped to the range) and ``v = U(g) q`` are the merged levels. This is the
``q^T U^T onehot(i(x))`` form of DDQ with the one-hot never built.

Backward:
- ``dL/dx = dL/dy`` where ``x`` lies within half a fine step of the level range, else 0
  (clipped straight-through, the same mask as ``torch.fake_quantize_per_tensor_affine``);
- ``dL/dv_i = sum of dL/dy over the elements with i(x) = i`` (a weighted histogram).

Only a ``uint8`` index (one byte per element) and a ``bool`` mask are saved, and only
when the corresponding gradient is needed: memory and time are O(N), and the index
search costs at most O(K) comparisons per element (``torch.bucketize``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AdaptiveIndexer", "UniformIndexer", "table_lookup"]


@dataclass(frozen=True)
class UniformIndexer:
    """Index on the evenly spaced fine grid ``q_i = s (i - offset)``: a rounding, no search.

    ``offset`` is a half-integer or integer kept exact in floating point, so that with
    ``offset`` an integer zero point the rounding equals PyTorch's fake-quantize ops.
    """

    inv_step: float
    offset: float
    n_levels: int

    def __call__(
        self, x: torch.Tensor, need_mask: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = torch.round(x * self.inv_step + self.offset)
        mask = ((t >= 0) & (t <= self.n_levels - 1)) if need_mask else None
        idx = t.clamp_(0, self.n_levels - 1).to(
            torch.uint8 if self.n_levels <= 256 else torch.int32
        )
        return idx, mask


@dataclass(frozen=True)
class AdaptiveIndexer:
    """Index on free sorted fine levels: binary search over the ``2^K - 1`` midpoints."""

    levels: torch.Tensor  # sorted fine levels q, detached

    def __call__(
        self, x: torch.Tensor, need_mask: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = self.levels
        mid = (q[1:] + q[:-1]) * 0.5
        idx = torch.bucketize(x, mid, out_int32=True)
        mask = None
        if need_mask:
            lo = q[0] - (q[1] - q[0]) * 0.5
            hi = q[-1] + (q[-1] - q[-2]) * 0.5
            mask = (x >= lo) & (x <= hi)
        if q.numel() <= 256:
            idx = idx.to(torch.uint8)
        return idx, mask


class _TableLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, v, indexer):  # type: ignore[override]
        need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        idx, mask = indexer(x, need_x)
        y = v.index_select(0, idx.reshape(-1).to(torch.int32)).view_as(x)
        ctx.n_levels = v.numel()
        ctx.save_for_backward(idx if need_v else None, mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        idx, mask = ctx.saved_tensors
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y * mask
        if ctx.needs_input_grad[1]:
            grad_v = torch.bincount(
                idx.reshape(-1), weights=grad_y.reshape(-1), minlength=ctx.n_levels
            ).to(grad_y.dtype)
        return grad_x, grad_v, None


def table_lookup(
    x: torch.Tensor, v: torch.Tensor, indexer: UniformIndexer | AdaptiveIndexer
) -> torch.Tensor:
    """Quantize ``x`` to the merged levels ``v`` with DDQ's straight-through backward.

    Example:
        >>> q = torch.tensor([-1.0, 0.0, 1.0, 2.0])
        >>> table_lookup(torch.tensor([0.3, 5.0]), q, AdaptiveIndexer(q))
        tensor([0., 2.])
    """
    return _TableLookup.apply(x, v, indexer)
