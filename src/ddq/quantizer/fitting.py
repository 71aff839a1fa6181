"""Data-driven levels: MSE-searched uniform grids, Lloyd (1-D k-means) tables, fine grids.

These set a quantizer's start (and re-fit it when its bitwidth changes) and are the
reference points the report measures learned levels against:

- ``best_uniform_step``: the step of the b-bit integer grid ``step * (j - Z)`` whose
  clipping range minimises the quantization MSE, searched per channel or per tensor (what
  the MSE observers of ONNX Runtime and brevitas do), coarse then fine.
- ``lloyd_levels``: ``n`` levels minimising the MSE to a sample (Lloyd's algorithm on the
  sorted sample with prefix sums: O(n log N) per iteration), optionally with one level
  pinned at 0 (post-ReLU activations, whose zeros must stay exact).
- ``fit_table_and_scales``: one table shared by all channels times a per-channel scale,
  alternating Lloyd on the channel-normalised weights with least-squares channel scales.
- ``fine_from_levels``: the ``2**K`` fine levels whose blocks of ``2**(K-b)`` average to
  given ``b``-bit levels, with the nearest-level boundaries between blocks at the
  midpoints of adjacent levels (Lloyd's nearest-neighbour condition).
"""

from __future__ import annotations

import torch

from .lookup import AdaptiveIndexer

__all__ = [
    "best_uniform_step",
    "fine_from_levels",
    "fit_table_and_scales",
    "lloyd_levels",
    "nearest_index",
    "quantize_to_levels",
    "table_mse",
    "uniform_grid",
    "uniform_quantize",
]

# Lloyd runs on at most this many elements (a strided subsample): plenty for <= 256 levels.
_MAX_SAMPLE = 1 << 18
# The MSE searches and the table/scale alternation run on at most this many elements (every
# channel keeps a strided subset of its columns): the quantizer's start on a large layer
# (VGG's 100M-weight classifier, a ViT-L MLP) costs seconds instead of minutes, and the
# 2**b <= 256 levels and one scale per channel are still fitted to >= 2**20 weights.
# (The level-quality report's references run on its own <= 2**18-weight samples: uncapped.)
FIT_MAX_ELEMENTS = 1 << 20
# ... but each channel keeps at least this many: its least-squares scale depends on its
# tails, and with fewer samples a heavy-tailed channel's fit degrades measurably.
_MIN_FIT_COLUMNS = 1024


def uniform_grid(bits: int, signed: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of the b-bit integer grid: ``-2**(b-1)..2**(b-1)-1`` or ``0..2**b-1``."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def uniform_quantize(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """``clamp(round(x / step), qmin, qmax) * step`` (``step`` broadcast against ``x``).

    Example:
        >>> uniform_quantize(torch.tensor([0.26, -0.9, 3.0]), torch.tensor(0.5), 2, True)
        tensor([ 0.5000, -1.0000,  0.5000])
    """
    qmin, qmax = uniform_grid(bits, signed)
    return torch.clamp(torch.round(x / step), qmin, qmax) * step


def _rows(x: torch.Tensor, channel_axis: int | None) -> torch.Tensor:
    # Fits run on the CPU whatever the tensor's device: they are small, rare (start,
    # bitwidth changes) and full of tiny host-side steps; callers copy results back.
    x = x.detach().float().cpu()
    if channel_axis is None:
        return x.reshape(1, -1)
    return x.movedim(channel_axis, 0).reshape(x.shape[channel_axis], -1)


def _fit_rows(rows: torch.Tensor, max_elements: int | None) -> torch.Tensor:
    """``rows`` with every ``k``-th column (the same ``k`` for all channels) so that at most
    ``max_elements`` remain, but never fewer than ``_MIN_FIT_COLUMNS`` per channel; all of
    them when ``max_elements`` is None."""
    if max_elements is None or rows.numel() <= max_elements:
        return rows
    stride = min(-(-rows.numel() // max_elements), rows.shape[1] // _MIN_FIT_COLUMNS)
    return rows[:, ::stride].contiguous() if stride > 1 else rows


def _row_mse(rows: torch.Tensor, step: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    return (uniform_quantize(rows, step[:, None], bits, signed) - rows).square_().mean(1)


@torch.no_grad()
def best_uniform_step(
    x: torch.Tensor,
    bits: int,
    signed: bool,
    channel_axis: int | None = None,
    coarse: int = 32,
    fine: int = 12,
    max_elements: int | None = FIT_MAX_ELEMENTS,
) -> torch.Tensor:
    """The MSE-optimal step of the b-bit integer grid, per channel or per tensor.

    Candidates are ``f * amax / qmax`` for ``f`` in ``(0, 1.1]`` (``amax`` the largest
    magnitude the grid must cover, ``qmax`` its largest code), ``coarse`` values evenly
    spaced, then ``fine`` values around the best one. ``amax`` is taken over all of ``x``;
    the MSE of each candidate over at most ``max_elements`` of them (a strided subset of
    each channel's columns; ``None``: all).

    Returns:
        A float32 tensor of shape ``(C,)`` (``channel_axis`` given) or ``()``.

    Example:
        >>> x = torch.randn(10_000)
        >>> s = best_uniform_step(x, bits=4, signed=True)
        >>> bool(s < x.abs().max() / 7)   # clips the tails
        True
    """
    rows = _rows(x, channel_axis)
    qmin, qmax = uniform_grid(bits, signed)
    if signed:
        amax = torch.maximum(rows.amax(1) / max(qmax, 1), -rows.amin(1) / -qmin)
    else:
        amax = rows.clamp(min=0).amax(1) / qmax
    rows = _fit_rows(rows, max_elements)
    base = amax.clamp(min=1e-12)
    best_err = torch.full_like(base, float("inf"))
    best_f = torch.ones_like(base)

    def scan(factors: torch.Tensor) -> None:
        nonlocal best_err, best_f
        for f in factors.unbind(-1) if factors.dim() > 1 else factors:
            err = _row_mse(rows, base * f, bits, signed)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_f = torch.where(better, f, best_f)

    width = 1.1 / coarse
    scan(torch.linspace(width, 1.1, coarse))
    offsets = torch.linspace(-width, width, fine + 2)[1:-1]
    scan((best_f[:, None] + offsets[None, :]).clamp(min=width / 4))
    step = base * best_f
    return step if channel_axis is not None else step.reshape(())


def _sample(x: torch.Tensor, max_sample: int = _MAX_SAMPLE) -> torch.Tensor:
    flat = x.detach().reshape(-1).float().cpu()
    if flat.numel() > max_sample:
        flat = flat[:: flat.numel() // max_sample + 1]
    return flat


def quantize_to_levels(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Each element of ``x`` replaced by its nearest value in the sorted ``levels``.

    Example:
        >>> quantize_to_levels(torch.tensor([0.1, 0.7, 5.0]), torch.tensor([0.0, 1.0]))
        tensor([0., 1., 1.])
    """
    return levels[nearest_index(x, levels)]


def nearest_index(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``levels`` for every element of ``x`` (int64).

    Uses the quantizer's own bucket-table search (the same result as ``torch.bucketize``
    on the midpoints, several times faster on the CPU).
    """
    levels = levels.to(x.dtype)
    if levels.numel() < 2:
        return torch.zeros(x.shape, dtype=torch.long, device=x.device)
    idx, _ = AdaptiveIndexer(levels)(x.reshape(-1).contiguous(), need_mask=False)
    return idx.long().view(x.shape)


@torch.no_grad()
def lloyd_levels(
    x: torch.Tensor,
    n_levels: int,
    iters: int = 40,
    fix_zero: bool = False,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """``n_levels`` sorted levels minimising the mean squared error to ``x`` (1-D k-means).

    Starts from ``init`` or, by default, from both the companding rule (level density
    proportional to ``p^(1/3)``) and the MSE-searched uniform grid, keeping the better
    result; Lloyd's iterations (on a sorted, strided sub-sample, with prefix sums) never
    raise the error, so the result is at least as good as that uniform grid. With
    ``fix_zero`` the lowest level is pinned at 0 (non-negative data whose zeros must stay
    exact). Levels are made strictly increasing.

    Example:
        >>> lloyd_levels(torch.tensor([0.0, 0.1, 0.9, 1.0]), 2)
        tensor([0.0500, 0.9500])
    """
    xs = torch.sort(_sample(x)).values.double()
    n = xs.numel()
    if n == 0:
        raise ValueError("lloyd_levels: empty input")
    if init is None:
        codes, step = _uniform_start(xs, n_levels, fix_zero, channel_axis=None)
        starts = [_companded_levels(xs, n_levels), codes.double() * float(step)]
        fits = [lloyd_levels(xs, n_levels, iters, fix_zero, s) for s in starts]
        errs = [
            float((quantize_to_levels(xs.float(), f) - xs.float()).square().mean()) for f in fits
        ]
        return fits[errs.index(min(errs))]
    csum = torch.cat([xs.new_zeros(1), torch.cumsum(xs, 0)])
    levels = init.detach().double().cpu().clone()
    if fix_zero:
        levels[0] = 0.0
    for _ in range(iters):
        levels = _strictly_increasing(levels, xs)
        mid = (levels[1:] + levels[:-1]) * 0.5
        pos = torch.cat(
            [xs.new_zeros(1, dtype=torch.long), torch.searchsorted(xs, mid), torch.tensor([n])]
        )
        count = (pos[1:] - pos[:-1]).double()
        sums = csum[pos[1:]] - csum[pos[:-1]]
        new = torch.where(count > 0, sums / count.clamp(min=1), levels)
        if fix_zero:
            new[0] = 0.0
        if torch.allclose(new, levels, rtol=0, atol=1e-12 * float(xs.abs().max() + 1e-30)):
            levels = new
            break
        levels = new
    return _strictly_increasing(levels, xs).float()


def _uniform_start(
    x: torch.Tensor, n_levels: int, fix_zero: bool, channel_axis: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MSE-searched uniform grid with ``n_levels`` levels (a power of two), as its
    integer codes ``qmin..qmax`` (float32) and its step (per channel along
    ``channel_axis``, or one): a start that Lloyd's iterations can only improve."""
    bits = max(int(n_levels).bit_length() - 1, 1)
    signed = not fix_zero and bool((x < 0).any())
    qmin, _ = uniform_grid(bits, signed)
    codes = torch.arange(n_levels, dtype=torch.float32) + qmin
    # x is already a (sub)sample: the callers' max_elements applied
    return codes, best_uniform_step(x, bits, signed, channel_axis=channel_axis, max_elements=None)


def _companded_levels(xs: torch.Tensor, n_levels: int, bins: int = 2048) -> torch.Tensor:
    """Levels at the quantiles of the density ``p^(1/3)`` (the companding rule, optimal for
    many levels: Panter-Dite), from a histogram of the sorted sample ``xs``.

    Plain quantiles of ``p`` would put almost no levels in the tails, and Lloyd's
    iterations take hundreds of steps to move them there at 64+ levels.
    """
    lo, hi = float(xs[0]), float(xs[-1])
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1.0):
        return torch.full((n_levels,), lo, dtype=torch.float64)
    hist = torch.histc(xs, bins=bins, min=lo, max=hi)
    dens = hist.clamp(min=0).pow(1.0 / 3.0)
    cdf = torch.cat([dens.new_zeros(1), torch.cumsum(dens, 0)])
    cdf = cdf / cdf[-1]
    targets = (torch.arange(n_levels, dtype=torch.float64) + 0.5) / n_levels
    pos = torch.searchsorted(cdf, targets).clamp(1, bins)
    # linear interpolation inside the bin
    c0, c1 = cdf[pos - 1], cdf[pos]
    frac = ((targets - c0) / (c1 - c0).clamp(min=1e-30)).clamp(0, 1)
    width = (hi - lo) / bins
    return lo + (pos - 1 + frac) * width


def _strictly_increasing(levels: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Spread tied levels (constant data, empty cells) by a tiny fraction of the spread."""
    eps = max(float(xs[-1] - xs[0]), float(xs.abs().max()), 1e-6) * 1e-6
    ramp = torch.arange(levels.numel(), dtype=levels.dtype) * eps
    # out[i] >= out[i-1] + eps  <=>  out - ramp is non-decreasing
    return torch.cummax(levels - ramp, 0).values + ramp


@torch.no_grad()
def fit_table_and_scales(
    w: torch.Tensor,
    n_levels: int,
    rounds: int = 2,
    fix_zero: bool = False,
    scales: torch.Tensor | None = None,
    max_elements: int | None = FIT_MAX_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One table for all channels (axis 0) times a per-channel scale, fitted to ``w``.

    Alternates Lloyd levels on ``w / scale`` with the least-squares scale of each channel
    for its current assignment (``sum w t / sum t^2``, ``t`` the assigned table values).
    Without ``scales`` it runs from two starts, the channels' RMS with a fresh Lloyd table
    and the best per-channel uniform grid, and keeps the lower error, which is then never
    above that of the best per-channel uniform grid. With ``scales`` (a re-fit) it starts
    from them; ``rounds=0`` keeps them and only fits the table. The fit sees at most
    ``max_elements`` weights (a strided subset of each channel's columns; ``None``: all).

    Returns:
        ``(table, scales)``: ``table`` sorted, shape ``(n_levels,)``; ``scales`` shape ``(C,)``.

    Example:
        >>> w = torch.randn(8, 50) * torch.linspace(0.1, 2, 8)[:, None]
        >>> table, scales = fit_table_and_scales(w, 8)
        >>> table.shape, scales.shape
        (torch.Size([8]), torch.Size([8]))
    """
    rows = _fit_rows(_rows(w, 0), max_elements)
    if scales is not None:  # a re-fit: start from the caller's scales
        return _alternate(rows, n_levels, rounds, fix_zero, scales.detach().float().cpu())
    grid, uni_scales = _uniform_start(rows, n_levels, fix_zero, channel_axis=0)
    candidates = [
        _alternate(rows, n_levels, rounds, fix_zero, rows.square().mean(1).sqrt()),
        # From the per-channel uniform grid: every step can only lower the error, so the
        # result is never worse than the best per-channel uniform grid.
        _alternate(rows, n_levels, rounds, fix_zero, uni_scales, grid),
    ]
    errs = [table_mse(rows, t, sc) for t, sc in candidates]
    return candidates[errs.index(min(errs))]


def table_mse(rows: torch.Tensor, table: torch.Tensor, scales: torch.Tensor) -> float:
    """MSE of ``rows`` (one channel per row) quantized to ``table`` times each row's scale.

    Example:
        >>> rows = torch.tensor([[0.9, 2.2]])  # / 2 -> 0.45, 1.1 -> levels 0, 1 -> 0, 2
        >>> round(table_mse(rows, torch.tensor([0.0, 1.0]), torch.tensor([2.0])), 4)
        0.425
    """
    q = quantize_to_levels(rows / scales[:, None], table) * scales[:, None]
    return float((q - rows).square().mean())


def _alternate(
    rows: torch.Tensor,
    n_levels: int,
    rounds: int,
    fix_zero: bool,
    scales: torch.Tensor,
    table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares channel scales and Lloyd table, alternated from the given start."""
    scales = scales.clamp(min=1e-12)
    if table is None:
        table = lloyd_levels(rows / scales[:, None], n_levels, fix_zero=fix_zero)
    for _ in range(rounds):
        for _ in range(3):
            # In float64: weights far from the kept scales (a diverged run's 1e13 against
            # 0.1) put table values near 1e21 here, whose squares overflow float32.
            t = table[nearest_index(rows / scales[:, None], table)].double()
            num, den = (rows.double() * t).sum(1), t.square().sum(1)
            ratio = num / den.clamp(min=1e-300)
            ok = (num > 0) & (den > 0) & (ratio < torch.finfo(torch.float32).max)  # not NaN/Inf
            scales = torch.where(ok, ratio, scales.double()).float().clamp(min=1e-12)
        table = lloyd_levels(rows / scales[:, None], n_levels, fix_zero=fix_zero, init=table)
    return table, scales


def fine_from_levels(levels: torch.Tensor, per_block: int) -> torch.Tensor:
    """``len(levels) * per_block`` sorted fine levels whose blocks average to ``levels``.

    Each block is centred on its level with the common spacing ``min_gap / per_block``,
    so adjacent blocks never overlap, the tightest pair of levels continues one evenly
    spaced grid, and the boundary between two blocks' nearest-level cells is the midpoint
    of their levels.

    Example:
        >>> fine_from_levels(torch.tensor([0.0, 1.0, 3.0]), 2)
        tensor([-0.2500,  0.2500,  0.7500,  1.2500,  2.7500,  3.2500])
    """
    levels = levels.double()
    if per_block == 1:
        return levels.float()
    gap = float((levels[1:] - levels[:-1]).min()) if levels.numel() > 1 else 1.0
    step = gap / per_block
    offsets = (torch.arange(per_block, dtype=torch.float64) - (per_block - 1) / 2) * step
    return (levels[:, None] + offsets[None, :]).reshape(-1).float()
