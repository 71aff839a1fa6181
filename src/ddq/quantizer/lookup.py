"""The quantizer's forward and custom backward: nearest-fine-level index, table lookup.

Forward: ``y = v[i(x)]`` where ``i(x)`` is the index of the fine level nearest to ``x``
(clamped to the range) and ``v = U(g) q`` are the merged levels. This is the
``q^T U^T onehot(i(x))`` form of DDQ with the one-hot never built.

Backward:
- ``dL/dx = dL/dy`` where ``x`` lies within half a fine step of the level range, else 0
  (clipped straight-through, the same mask as ``torch.fake_quantize_per_tensor_affine``);
- ``dL/dv_i = sum of dL/dy over the elements with i(x) = i`` (a weighted histogram).

Both indexers compute one *extended index* ``e`` in ``0..n+1`` (``n`` fine levels):
``0`` below the range, ``n + 1`` above it, ``i(x) + 1`` inside. Three small tables
indexed by ``e`` then give the output (``v`` padded with its end values), the
straight-through mask and the level index, so the range test costs no comparisons.

- ``UniformIndexer``: ``e = clamp(round(x / s + offset), -1, n) + 1``, a rounding.
- ``AdaptiveIndexer``: ``e`` = the number of the ``n + 1`` sorted boundaries
  ``(lo^-, m_0, ..., m_{n-2}, hi)`` below ``x`` (``m`` the midpoints between levels,
  ``lo^-`` the float just below ``lo``, so ``e >= 1`` exactly when ``x >= lo``). On CPU
  a uniform bucket table over the boundaries gives, per element, the count of the
  boundaries in all lower buckets; vectorised compare-and-step rounds, as many as the
  fullest bucket holds boundaries (1 or 2 for trained levels), finish the count. The
  bucket of ``x`` and of the boundaries is computed by the same monotone float
  operations, so the result equals ``torch.bucketize`` exactly, ties included. Very
  clustered levels (more than ``_MAX_ROUNDS`` boundaries in one bucket even of the finer
  table), small tensors and non-CPU devices use ``torch.bucketize`` (a binary search,
  O(K) comparisons per element, but about 20x slower per element on CPU).

Time and memory are O(N) and nothing of size ``N x 2^K`` exists. The work happens in
place where it can, because fresh large tensors cost page faults (on some machines more
than the arithmetic): besides its output the forward allocates one float-sized scratch
tensor (the adaptive search allocates the index and writes the output into its scratch)
and the two one-byte tensors saved for backward, each only when its gradient is needed:
the level index (``uint8``; ``int32`` beyond 256 levels) and the in-range mask (``uint8``
0/1: it multiplies the gradient exactly like a ``bool`` mask, through a faster kernel).
Two bytes per element are kept for backward, as many as ``fake_quantize``'s one-byte mask
plus the index the level gradient needs.

Inputs that are NaN (possible in eval mode; training refuses them earlier) get zero
gradient and an unspecified level.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["AdaptiveIndexer", "UniformIndexer", "table_lookup"]

# Integer dtypes of the same width as a float dtype: a float scratch tensor is converted
# to its index in place (a view of the same storage) instead of into a new tensor.
_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64}

# Adaptive search: bucket tables tried, in buckets per boundary (rounded up to a power of
# two): the first is small enough to stay in cache; the second, finer one splits clustered
# levels and is tried when it can save a compare-and-step round, on large inputs only
# (building it costs ~0.1 ms; a round costs a few ns per element).
_BUCKETS_PER_BOUNDARY = (8, 128)
_FINE_TABLE_NUMEL = 1 << 17
# More compare-and-step rounds than this and torch.bucketize is the faster search.
_MAX_ROUNDS = 12
# Below this many elements the table's set-up (~0.1 ms) is not repaid (the break-even
# with torch.bucketize is near 2000 elements for 256 levels).
_MIN_TABLE_NUMEL = 4096


def _to_index(t: torch.Tensor) -> torch.Tensor:
    """Convert a 1-D float tensor of integral values to an index tensor, in place if possible.

    Writing the int view of the same storage is an elementwise in-place op (each element
    overwrites itself), as safe as ``t.add_(1)``; it saves a page-faulting allocation.
    """
    int_dtype = _SAME_WIDTH_INT.get(t.dtype)
    if int_dtype is None:
        return t.to(torch.int32)
    out = t.view(int_dtype)
    out.copy_(t)
    return out


@functools.lru_cache(maxsize=64)
def _mask_table(n: int, device: torch.device) -> torch.Tensor:
    """``uint8`` in-range flag per extended index: 0 at both ends, 1 inside.

    Cached (the tables are tiny, never written to) to keep per-call overhead low.
    """
    table = torch.ones(n + 2, dtype=torch.uint8, device=device)
    table[0] = table[-1] = 0
    return table


@functools.lru_cache(maxsize=64)
def _index_table(n: int, device: torch.device) -> torch.Tensor:
    """Clamped level index per extended index, ``uint8`` up to 256 levels (cached)."""
    table = torch.arange(-1, n + 1, device=device).clamp_(0, n - 1)
    return table.to(torch.uint8 if n <= 256 else torch.int32)


def _split(e: torch.Tensor, n: int, need_mask: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clamped level index and optional ``bool`` in-range mask from the extended index."""
    idx = _index_table(n, e.device).index_select(0, e)
    mask = _mask_table(n, e.device).index_select(0, e).view(torch.bool) if need_mask else None
    return idx, mask


@dataclass(frozen=True)
class UniformIndexer:
    """Index on the evenly spaced fine grid ``q_i = s (i - offset)``: a rounding, no search.

    ``offset`` is a half-integer or integer kept exact in floating point, so that with
    ``offset`` an integer zero point the rounding equals PyTorch's fake-quantize ops.
    """

    inv_step: float
    offset: float
    n_levels: int

    def extended_index(self, x: torch.Tensor) -> torch.Tensor:
        """``clamp(round(x * inv_step + offset), -1, n) + 1`` as a 1-D integer tensor."""
        return self._extended_index(x)[0]

    def _extended_index(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        n = self.n_levels
        # One scratch tensor, every step in place. The multiply and add stay two roundings
        # (no fused multiply-add), exactly as ``round(x * inv_step + offset)``.
        t = x.reshape(-1) * self.inv_step
        e = _to_index(t.add_(self.offset).round_().clamp_(-1, n))
        # +1 in integers (exact where a half-precision float is not); NaN survives the
        # float clamp and converts to an arbitrary integer, hence the second clamp.
        return e.add_(1).clamp_(0, n + 1), None

    def __call__(
        self, x: torch.Tensor, need_mask: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The clamped level index (``uint8`` up to 256 levels) and optional in-range mask."""
        idx, mask = _split(self.extended_index(x), self.n_levels, need_mask)
        return idx.view(x.shape), None if mask is None else mask.view(x.shape)


@dataclass(frozen=True)
class AdaptiveIndexer:
    """Index on free sorted fine levels: the nearest level, searched among the midpoints."""

    levels: torch.Tensor  # sorted fine levels q, detached

    def boundaries(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The ``n + 1`` boundaries ``(lo^-, m_0, ..., m_{n-2}, hi)`` for the input ``x``.

        ``m``, ``lo`` and ``hi`` are computed in the levels' dtype; ``lo`` and ``hi`` are
        then rounded to the dtype in which ``x >= lo`` and ``x <= hi`` compare (a 0-dim
        level tensor takes ``x``'s dtype), so the range test is unchanged. Everything is
        returned in ``dtype``, which holds ``x`` exactly; ``lo^-`` is the largest ``dtype``
        value below ``lo``, so that ``lo^- < x`` is exactly ``x >= lo``.
        """
        q = self.levels
        mid = (q[1:] + q[:-1]) * 0.5
        lo = q[0] - (q[1] - q[0]) * 0.5
        hi = q[-1] + (q[-1] - q[-2]) * 0.5
        compare = torch.result_type(x, lo)
        lo, hi = (t.to(compare).to(dtype).reshape(1) for t in (lo, hi))
        below_lo = torch.nextafter(lo, lo.new_tensor(-float("inf")))
        return torch.cat([below_lo, mid.to(dtype), hi])

    def extended_index(self, x: torch.Tensor) -> torch.Tensor:
        """The number of boundaries below ``x`` (``torch.bucketize``'s count) as 1-D ints."""
        return self._extended_index(x)[0]

    def _extended_index(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The extended index and, when the search left one, a free scratch like ``x``."""
        dtype = torch.promote_types(x.dtype, self.levels.dtype)
        xf = x.reshape(-1).to(dtype)
        bounds = self.boundaries(x, dtype)
        if xf.device.type == "cpu" and xf.numel() >= _MIN_TABLE_NUMEL:
            found = _table_search(xf, bounds)
            if found is not None:
                return found
        return torch.bucketize(xf, bounds, out_int32=True), None

    def __call__(
        self, x: torch.Tensor, need_mask: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The clamped level index (``uint8`` up to 256 levels) and optional in-range mask."""
        idx, mask = _split(self.extended_index(x), self.levels.numel(), need_mask)
        return idx.view(x.shape), None if mask is None else mask.view(x.shape)


def _bucket_of(t: torch.Tensor, origin: float, inv_width: float, n_buckets: int) -> torch.Tensor:
    """``clamp(floor((t - origin) * inv_width), 0, n_buckets - 1)``, in place on a copy.

    Subtract, multiply, clamp and truncation are each monotone in IEEE arithmetic, so
    ``a <= b`` implies ``bucket(a) <= bucket(b)``: the property the table search needs.
    Boundaries and inputs must go through this same function in the same dtype.
    """
    u = t - origin
    u.mul_(inv_width).clamp_(0, n_buckets - 1)  # after the clamp, truncation is a floor
    return _to_index(u).clamp_(0, n_buckets - 1)  # NaN: see UniformIndexer._extended_index


def _table_search(
    x: torch.Tensor, bounds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``torch.bucketize(x, bounds)`` for 1-D ``x`` by bucket table and local steps.

    With ``b(.)`` the monotone bucket map, every boundary in a lower bucket than ``x`` is
    below ``x`` and every boundary in a higher bucket is not, so the count lies between
    ``start[b(x)]`` (boundaries in lower buckets) and that plus the occupancy of ``b(x)``;
    stepping over the boundaries of ``b(x)`` one at a time, for as many rounds as the
    fullest bucket holds, finishes it. Returns the count and the float scratch it no
    longer needs (the caller may write the output there), or None when the levels are
    too clustered.
    """
    origin, top = float(bounds[0]), float(bounds[-1])
    # The steps rely on sorted finite boundaries (NaN levels fail the test too).
    if not -float("inf") < origin < top < float("inf"):
        return None
    if not bool((bounds[1:] >= bounds[:-1]).all()):
        return None
    best: tuple[int, int, float, torch.Tensor] | None = None
    for per_boundary in _BUCKETS_PER_BOUNDARY:
        n_buckets = 1 << max(6, (per_boundary * bounds.numel() - 1).bit_length())
        inv_width = n_buckets / (top - origin)
        if inv_width > torch.finfo(x.dtype).max:  # must stay finite in x's dtype
            break
        counts = torch.bincount(
            _bucket_of(bounds, origin, inv_width, n_buckets), minlength=n_buckets
        )
        rounds = int(counts.max())
        if best is None or rounds < best[0]:
            best = (rounds, n_buckets, inv_width, counts)
        if rounds <= 1 or (rounds <= 2 and x.numel() < _FINE_TABLE_NUMEL):
            break
    if best is None or best[0] > _MAX_ROUNDS:
        return None
    rounds, n_buckets, inv_width, counts = best
    # One more boundary at +inf: a step never runs past the end (the count is <= n + 1).
    padded = torch.cat([bounds, bounds.new_tensor([float("inf")])])
    j = _bucket_of(x, origin, inv_width, n_buckets)
    e = (torch.cumsum(counts, 0) - counts).to(j.dtype).index_select(0, j)
    # j is spent: reuse its storage for the gathered boundaries and for the comparison
    # result, written over them as integers of e's dtype (an elementwise in-place op;
    # faster than a bool result added to e, and no allocation).
    same_width = j.dtype.itemsize == x.dtype.itemsize
    scratch = j.view(x.dtype) if same_width else torch.empty_like(x)
    below = j if same_width else torch.empty_like(e)
    for _ in range(rounds):
        torch.index_select(padded, 0, e, out=scratch)
        torch.lt(scratch, x, out=below)
        e.add_(below)
    return e, scratch


class _TableLookup(torch.autograd.Function):
    """``y = v[i(x)]``; backward: masked straight-through for ``x``, histogram for ``v``."""

    @staticmethod
    def forward(ctx, x, v, indexer):  # type: ignore[override]
        need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        e, spare = indexer._extended_index(x)
        n = v.numel()
        values = torch.cat([v[:1], v, v[-1:]])
        if spare is not None and spare.dtype == values.dtype:  # one allocation fewer
            y = torch.index_select(values, 0, e, out=spare).view(x.shape)
        else:
            y = values.index_select(0, e).view(x.shape)
        # Two bytes per element are kept for backward, not the 4- or 8-byte index ``e``.
        mask = _mask_table(n, e.device).index_select(0, e) if need_x else None
        idx = _index_table(n, e.device).index_select(0, e) if need_v else None
        ctx.n_levels = n
        ctx.save_for_backward(idx, mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        idx, mask = ctx.saved_tensors
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            # uint8 0/1 multiplies like a bool mask (same values, NaN and -0.0 included)
            # but takes a faster kernel than bool-to-float promotion.
            grad_x = grad_y * mask.view(grad_y.shape)
        if ctx.needs_input_grad[1]:
            grad_v = torch.bincount(idx, weights=grad_y.reshape(-1), minlength=ctx.n_levels).to(
                grad_y.dtype
            )
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
