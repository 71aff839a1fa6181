"""``DDQQuantizer``: one tensor's differentiable dynamic quantizer (docs/method.md)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .fitting import best_uniform_step, fine_from_levels, fit_table_and_scales, lloyd_levels
from .gates import ordered_gates
from .lookup import AdaptiveIndexer, UniformIndexer, table_lookup
from .merge import kronecker_merge
from .observer import RangeObserver, has_nonfinite

__all__ = ["MODES", "DDQQuantizer", "snap_to_grid"]

Mode = Literal["adaptive", "uniform"]
MODES: tuple[str, ...] = ("adaptive", "uniform")

# Gate logits start at GATE_INIT + GATE_STEP * (b - k) for an open bit k of b (mirrored
# below zero for closed ones): the least significant open bit is nearest to closing and
# each more significant bit a step further, so under budget pressure bits close one at a
# time, least significant first, instead of all together. With Adam at the default gate
# learning rate one step is a few dozen updates of consistent pressure.
GATE_INIT = 0.25
GATE_STEP = 0.25


def _initial_logits(bits: int, max_bits: int) -> torch.Tensor:
    k = torch.arange(1, max_bits + 1, dtype=torch.float32)
    open_ = GATE_INIT + GATE_STEP * (bits - k)
    closed = -GATE_INIT - GATE_STEP * (k - bits - 1)
    return torch.where(k <= bits, open_, closed)


_SOFTPLUS_INV_ONE = math.log(math.expm1(1.0))


def _version_of(x: torch.Tensor) -> tuple[int, int] | None:
    """``(id, in-place version)`` of a tensor; ``None`` for inference-mode tensors."""
    try:
        return id(x), x._version
    except RuntimeError:
        return None


def _softplus_inv(y: torch.Tensor) -> torch.Tensor:
    """``log(expm1(y))`` for ``y > 0``, stable for small and large ``y``."""
    y = y.clamp(min=1e-12)
    return y + torch.log(-torch.expm1(-y))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient multiplied by ``factor`` (as in LSQ).

    A Function rather than LSQ's ``(x - x f).detach() + x f`` trick, which is not an exact
    identity in floating point and would move levels off the values ``levels()`` reports.
    """

    @staticmethod
    def forward(ctx, x, factor):  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad * ctx.factor, None


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x if factor == 1.0 else _ScaleGrad.apply(x, factor)


class _GridRound(torch.autograd.Function):
    """``round(x / step) * step`` forward, identity gradient (straight-through).

    A Function rather than ``x + (grid - x).detach()``, so that the forward value is the
    grid value itself, bit for bit, whatever the float rounding of that sum.
    """

    @staticmethod
    def forward(ctx, x, step):  # type: ignore[override]
        return torch.round(x / step) * step

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


def snap_to_grid(levels: torch.Tensor, grid_bits: int) -> torch.Tensor:
    """``levels`` rounded onto the symmetric signed ``grid_bits``-bit grid of their own peak.

    With ``top = 2**(grid_bits - 1) - 1`` (127 for 8 bits) and ``L = max |levels|``, each
    level becomes ``round(top * level / L) * L / top``, computed as ``round(level / step)
    * step`` with ``step = L / top`` in the levels' dtype: the rounding that
    :func:`ddq.deploy.int8_codes.adaptive_to_int8` applies at export (``top = 127``), so
    levels snapped here map onto the same integer codes there, with no loss beyond float
    rounding of the step. ``L`` is detached and the rounding is straight-through: the gradient
    reaching the levels is the one they would get without the grid. (The peak level is
    itself a learned level; a gradient through ``L`` would add the rounding residuals of
    every level to that one level's update, noise unrelated to the task.) All-zero
    levels stay zero.

    Example:
        >>> snap_to_grid(torch.tensor([-1.0, -0.3, 0.2, 1.0]), 3)
        tensor([-1.0000, -0.3333,  0.3333,  1.0000])
    """
    if not isinstance(grid_bits, int) or isinstance(grid_bits, bool) or not 2 <= grid_bits <= 8:
        raise ValueError(f"grid_bits must be an integer in 2..8, got {grid_bits!r}")
    top = 2 ** (grid_bits - 1) - 1
    # ``tiny`` instead of a branch on zero (no host sync): all-zero levels round to 0.
    peak = levels.detach().abs().max().clamp(min=torch.finfo(levels.dtype).tiny)
    return _GridRound.apply(levels, peak / top)


class DDQQuantizer(nn.Module):
    """Learns one tensor's bitwidth, dynamic range and quantization levels by gradient.

    There are ``2**max_bits`` sorted fine levels ``q``; ``max_bits`` ordered gates pick the
    bitwidth ``b``; the gated Kronecker merge ``v = U(g) q`` averages adjacent blocks of
    ``2**(max_bits - b)`` fine levels into the ``2**b`` levels in use. An input goes to the
    merged level of its nearest fine level (see :mod:`ddq.quantizer.lookup` for the
    backward pass).

    Modes:
        ``"adaptive"``: free sorted levels ``q_i = lo + sum_{j<i} softplus(theta_j) u``
        (sorted by construction; ``u`` a fixed unit set at initialisation so the
        parameters are O(1)). Deploys as a ``b``-bit index plus a ``2**b`` table.
        Unsigned (activations after a ReLU): the grid is shifted so that its lowest
        ``2**(K-b)`` fine levels average to exactly 0, i.e. the lowest merged level is 0
        at every bitwidth. *Departure from the paper's formulation* (``lo`` fixed at 0): block means of a
        grid starting at 0 start at half a block above 0, so a ReLU's zeros, often most
        of a tensor, would all be moved up by that much at low bits; at 3-4 bits this
        took a calibrated MobileNetV2 from 90% to 10-17% before any training.

        ``"uniform"``: ``q_i = s (i - c_b)`` with a learnable step ``s = s_0 exp(lambda)``.
        The anchor ``c_b = Z_b 2^(K-b) + (2^(K-b) - 1) / 2`` is chosen from the current
        bitwidth so that the merged ``b``-bit levels are exactly ``S (j - Z_b)`` with step
        ``S = 2^(K-b) s`` and integer zero point ``Z_b = 2^(b-1)`` (signed) or ``0``
        (unsigned): a standard integer quantizer at every bitwidth, deployable as
        int8/uint8 QDQ. *Departure from the paper's formulation*, which has a free ``lo``: block means of a
        free uniform grid sit half a fine step off any integer zero point, which no integer
        runtime can represent. Use ``"adaptive"`` for asymmetric ranges.

    Per-channel (``channels=C``, weights): one normalised table per layer times a learned
    scale per output channel (axis 0): an element of channel ``c`` quantizes to
    ``levels()[j] * channel_scales()[c]`` (one float multiply, which a runtime repeats
    exactly). Bits stay per layer, as in the paper. In uniform mode the normalised fine
    step is fixed at exactly 1, so the normalised ``b``-bit grid is ``2^(K-b) (j - Z_b)``
    and the channel's integer step is ``2^(K-b) channel_scales()[c]``: per-channel int8
    QDQ with one zero point.

    Data-driven start (``init_from``): uniform grids take the MSE-searched clipping step
    at the current bitwidth (per channel when per-channel); adaptive tables take Lloyd's
    (k-means) levels at the current bitwidth (alternated with a per-channel scale search
    when per-channel), spread into fine levels by ``fitting.fine_from_levels``. With
    ``refit_on_bits=True`` (weights) the quantizer re-fits itself from its input whenever
    its bitwidth differs from the one it was fitted at (gates, the budget fit), so a
    layer that drops to 3 bits gets the best 3-bit levels, not the 8-bit ones merged.

    Integer-grid levels (``level_grid=n``, adaptive mode): the ``2**b`` merged levels are
    snapped in every forward, training and eval, onto the symmetric signed ``n``-bit grid
    of their own peak, ``round(top * v / L) * L / top`` with ``top = 2**(n-1) - 1`` and
    ``L = max |v|`` (:func:`snap_to_grid`; straight-through, so the levels still learn).
    ``levels()``, the frozen table and the forward are then the same grid values, and the
    int8 export (``ddq.deploy.int8_codes``, ``n = 8``) maps them onto its codes exactly:
    what an integer runtime computes is what was trained. Uniform levels are an integer
    grid already; a uniform quantizer refuses the option.

    Level-gradient scaling: the gradient of every level parameter is multiplied by
    ``1 / sqrt(N (2^b - 1))`` (``N`` the tensor's element count), LSQ's rule, so that one
    learning rate serves layers of every size. The gate logits are *not* scaled: their
    task gradient must stay comparable with the budget's, which grows with ``N`` too.

    Args:
        max_bits: ``K``, the largest bitwidth, 1..8.
        min_bits: the floor ``b_min``: bits ``1..min_bits`` never close.
        mode: ``"adaptive"`` or ``"uniform"``.
        signed: ``True``/``False``, or ``None`` to decide from the data at initialisation
            (unsigned when nothing observed is negative, e.g. after a ReLU).
        grad_scale: apply the level-gradient scaling above.
        channels: the number of output channels (axis 0) for per-channel scales, or
            ``None`` for one range per tensor.
        refit_on_bits: re-initialise from the input whenever the bitwidth changes (for
            weight quantizers, whose input is the weight itself).
        level_grid: adaptive mode: snap the levels onto the symmetric signed grid of this
            many bits (2..8; see above), or ``None`` for free levels.

    Example:
        >>> qz = DDQQuantizer(max_bits=4, min_bits=2, mode="uniform")
        >>> qz.init_from(torch.linspace(-1, 1, 100))
        >>> qz.set_bits(2)
        >>> qz.bits, qz.levels().numel()
        (2, 4)
        >>> bool(torch.isin(qz(torch.randn(10)), qz.levels()).all())
        True
    """

    def __init__(
        self,
        max_bits: int = 8,
        min_bits: int = 2,
        mode: Mode = "adaptive",
        signed: bool | None = True,
        grad_scale: bool = True,
        channels: int | None = None,
        refit_on_bits: bool = False,
        level_grid: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(max_bits, int) or not 1 <= max_bits <= 8:
            raise ValueError(f"max_bits must be an integer in 1..8, got {max_bits!r}")
        if not isinstance(min_bits, int) or not 1 <= min_bits <= max_bits:
            raise ValueError(
                f"min_bits must be an integer in 1..max_bits={max_bits}, got {min_bits!r}"
            )
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if channels is not None and (not isinstance(channels, int) or channels < 1):
            raise ValueError(f"channels must be None or a positive integer, got {channels!r}")
        if level_grid is not None:
            if (
                isinstance(level_grid, bool)
                or not isinstance(level_grid, int)
                or not 2 <= level_grid <= 8
            ):
                raise ValueError(
                    f"level_grid must be None or an integer in 2..8, got {level_grid!r}"
                )
            if mode != "adaptive":
                raise ValueError(
                    f"level_grid is for adaptive levels; {mode} levels are an integer grid already"
                )
        self.max_bits = max_bits
        self.signed_from_data = signed is None  # re-decided by every calibration
        self.channels = channels
        self.refit_on_bits = refit_on_bits
        # Configuration, not state: set by whoever builds the quantizer (DDQConfig), so
        # state dicts and checkpoints are the same with and without it.
        self.level_grid = level_grid
        self.mode: Mode = mode
        self.grad_scale = grad_scale
        self.name = ""  # set by ddq.prepare; used in error messages
        self.enabled = True
        self.calibrating = False
        self._observer: RangeObserver | None = None
        n = 2**max_bits
        self.gate_logits = nn.Parameter(_initial_logits(max_bits, max_bits))
        if mode == "adaptive":
            self.lo = nn.Parameter(torch.tensor(0.0))
            self.raw_gaps = nn.Parameter(torch.full((n - 1,), _SOFTPLUS_INV_ONE))
        elif channels is None:
            self.log_step = nn.Parameter(torch.tensor(0.0))
        # Per-channel uniform: the normalised fine step is exactly 1 (scale_ref), the
        # channel scales carry the range; a learnable global step would be redundant.
        if channels is not None:
            self.log_channel_scale = nn.Parameter(torch.zeros(channels))
            self.register_buffer("channel_ref", torch.ones(channels))
        # Persistent state (saved in checkpoints, loadable with weights_only=True).
        self.register_buffer("scale_ref", torch.tensor(1.0))
        self.register_buffer("floor", torch.tensor(min_bits))
        self.register_buffer("ceiling", torch.tensor(max_bits))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed_state", torch.tensor(-1 if signed is None else int(signed)))
        # The bitwidth the levels were last fitted from data at (-1: never).
        self.register_buffer("fit_bits", torch.tensor(-1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # Checkpoints written before ``fit_bits`` existed: treat them as fitted at their bits.
        key = prefix + "fit_bits"
        if key not in state_dict and prefix + "gate_logits" in state_dict:
            gates = ordered_gates(
                state_dict[prefix + "gate_logits"],
                int(state_dict.get(prefix + "floor", self.floor)),
                int(state_dict.get(prefix + "ceiling", self.ceiling)),
            )
            state_dict[key] = gates.sum().long()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----------------------------------------------------------------- state queries
    @property
    def n_fine(self) -> int:
        """Number of fine levels, ``2**max_bits``."""
        return 2**self.max_bits

    @property
    def min_bits(self) -> int:
        return int(self.floor)

    @property
    def signed(self) -> bool | None:
        """``None`` until decided from data (when constructed with ``signed=None``)."""
        s = int(self.signed_state)
        return None if s < 0 else bool(s)

    @property
    def per_channel(self) -> bool:
        return self.channels is not None

    def _channel_scales(self) -> torch.Tensor:
        return self.channel_ref * torch.exp(self.log_channel_scale)

    def channel_scales(self) -> torch.Tensor | None:
        """Per-channel scales (shape ``(C,)``, float32), or ``None`` for a per-tensor quantizer.

        An element of channel ``c`` quantizes to ``levels()[j] * channel_scales()[c]``.
        """
        if self.channels is None:
            return None
        with torch.no_grad():
            return self._channel_scales().float().clone()

    def gates(self) -> torch.Tensor:
        """Ordered hard gates ``g`` (shape ``(max_bits,)``) with straight-through gradient."""
        return ordered_gates(self.gate_logits, int(self.floor), int(self.ceiling))

    def bits_tensor(self) -> torch.Tensor:
        """The bitwidth ``sum(g)`` as a differentiable scalar (for cost models)."""
        return self.gates().sum()

    @property
    def bits(self) -> int:
        """The current bitwidth."""
        with torch.no_grad():
            return int(self.bits_tensor().item())

    def fine_levels(self, bits: int | None = None) -> torch.Tensor:
        """The ``2**max_bits`` sorted fine levels ``q`` (``bits``: the current bitwidth,
        passed by callers that already know it; uniform mode anchors on it)."""
        n = self.n_fine
        if self.mode == "adaptive":
            unit = self.scale_ref / (n - 1)
            gaps = F.softplus(self.raw_gaps) * unit
            if self.signed is not False:
                lo = self.lo * self.scale_ref
                return torch.cat([lo.reshape(1), lo + torch.cumsum(gaps, 0)])
            # Unsigned: shift the grid so the lowest block (merged level 0) averages to 0.
            # ``lo`` is unused here but stays in the graph (times 0): DDP requires every
            # parameter to receive a gradient.
            q = torch.cat([self.lo.reshape(1) * 0, torch.cumsum(gaps, 0)])
            m = 2 ** (self.max_bits - (self.bits if bits is None else bits))
            return q - q[:m].mean()
        step = self._fine_step()
        idx = torch.arange(n, device=step.device, dtype=step.dtype)
        return step * (idx - self._uniform_anchor(self.bits if bits is None else bits))

    def _fine_step(self) -> torch.Tensor:
        """Uniform mode: the fine step ``s`` (one rounding, as every consumer sees it)."""
        if self.channels is not None:
            return self.scale_ref  # exactly 1: see the class docstring
        return self.scale_ref * torch.exp(self.log_step)

    def merged_levels(self) -> torch.Tensor:
        """``v = U(g) q``: one value per fine index, ``2**b`` distinct."""
        return self._merged_with_bits()[0]

    def _merged_with_bits(self) -> tuple[torch.Tensor, int]:
        """``merged_levels()`` and the bitwidth, from one evaluation of the gates."""
        g = self.gates()
        bits = int(g.detach().sum())
        return self._merge(self.fine_levels(bits), g, bits), bits

    def _merge(self, q: torch.Tensor, g: torch.Tensor, bits: int) -> torch.Tensor:
        v = kronecker_merge(q, g)
        if self.mode == "adaptive" and self.signed is False:
            # The lowest level is 0 by construction (see fine_levels); make it 0 to the last
            # bit, so a ReLU's zeros stay exact zeros in training and in the deployed table.
            m = 2 ** (self.max_bits - bits)
            v = torch.cat([v[:m] - v[:m].detach(), v[m:]])
        if self.level_grid is not None:
            # After the merge (the grid is of the 2**b levels in use) and after the unsigned
            # zero above (0 snaps to exactly 0), so forward, levels() and the frozen table
            # all hold the grid values.
            v = snap_to_grid(v, self.level_grid)
        if self.mode == "uniform":
            # Block means of the uniform grid equal S (j - Z) exactly in real arithmetic but
            # not always to the last float bit; use the exact grid values (what an integer
            # runtime computes) and keep the merge's gradients.
            m = 2 ** (self.max_bits - bits)
            step = self._fine_step().detach() * m
            j = torch.arange(self.n_fine, device=q.device, dtype=q.dtype).div_(m).floor_()
            zero = 2 ** (bits - 1) if self.signed is not False else 0
            v = v + ((j - zero) * step - v).detach()
        return v

    @torch.no_grad()
    def levels(self) -> torch.Tensor:
        """The ``2**b`` distinct levels in use, sorted."""
        v, bits = self._merged_with_bits()
        return v[:: 2 ** (self.max_bits - bits)].clone()

    def _uniform_anchor(self, bits: int) -> float:
        m = 2 ** (self.max_bits - bits)
        zero = 2 ** (bits - 1) if self.signed is not False else 0
        return zero * m + (m - 1) / 2

    def uniform_params(self) -> tuple[float, int]:
        """Uniform mode: ``(scale, zero_point)`` of the current ``b``-bit integer grid.

        The levels are ``scale * (j - zero_point)`` for ``j = 0..2**b - 1``.
        """
        if self.mode != "uniform":
            raise ValueError("uniform_params() is only defined in uniform mode")
        b = self.bits
        step = float(self._fine_step().detach())
        return step * 2 ** (self.max_bits - b), (2 ** (b - 1) if self.signed is not False else 0)

    # ----------------------------------------------------------------- set-up
    def set_bits(self, bits: int, trainable: bool = False) -> None:
        """Force the bitwidth to ``bits``.

        With ``trainable=False`` the gates are frozen there (a fixed-bit baseline, or a
        first/last-layer convention); with ``trainable=True`` they start there and keep
        learning between ``min_bits`` and the current ceiling.
        """
        if not isinstance(bits, int) or not 1 <= bits <= self.max_bits:
            raise ValueError(f"bits must be an integer in 1..{self.max_bits}, got {bits!r}")
        if trainable and not int(self.floor) <= bits <= int(self.ceiling):
            raise ValueError(
                f"bits={bits} lies outside the trainable range "
                f"{int(self.floor)}..{int(self.ceiling)}"
            )
        with torch.no_grad():
            self.gate_logits.copy_(_initial_logits(bits, self.max_bits))
            if not trainable:
                self.floor.fill_(bits)
                self.ceiling.fill_(bits)

    def set_max_bits_cap(self, cap: int) -> None:
        """Keep the bitwidth at or below ``cap`` (e.g. a budget's activation-bit cap)."""
        if not int(self.floor) <= cap <= self.max_bits:
            raise ValueError(f"bit cap {cap} lies outside {int(self.floor)}..{self.max_bits}")
        self.ceiling.fill_(cap)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, keep_channel_scales: bool = False) -> None:
        """Fit the levels to a tensor at the current bitwidth (see the class docstring).

        Uniform: the MSE-searched clipping step (per channel for a per-channel quantizer).
        Adaptive: Lloyd's levels (with per-channel scales for a per-channel quantizer), the
        lowest pinned at 0 when unsigned. Signedness, if undecided, is decided here.
        ``keep_channel_scales`` (adaptive, per-channel): keep the learned channel scales and
        fit only the table (what a bitwidth change re-fits: cheap, and the scales stay).
        """
        x_in = x
        x = x.detach()
        self._check_finite(x)
        if x.numel() == 0:
            raise ValueError(f"{self._label()}: cannot initialise from an empty tensor")
        if self.channels is not None and (x.dim() == 0 or x.shape[0] != self.channels):
            raise ValueError(
                f"{self._label()}: per-channel quantizer for {self.channels} channels got a "
                f"tensor of shape {tuple(x.shape)}"
            )
        if self.signed is None:
            self.signed_state.fill_(int(bool((x < 0).any())))
        signed = bool(self.signed)
        if not signed:
            x = x.clamp(min=0)
        if float(x.abs().max()) <= 1e-12:  # all zeros: any small positive range will do
            if self.channels is not None:
                self.channel_ref.fill_(1e-6)
                self.log_channel_scale.zero_()
                x = torch.zeros(1)
            else:
                self.init_range(0.0, 1e-6)
                self.fit_bits.fill_(self.bits)
                return
        b = self.bits
        block = 2 ** (self.max_bits - b)
        if self.mode == "uniform":
            if self.channels is not None:
                step = best_uniform_step(x, b, signed, channel_axis=0)
                self.channel_ref.copy_(step / block)
                self.log_channel_scale.zero_()
                self.scale_ref.fill_(1.0)
            else:
                step = best_uniform_step(x, b, signed)
                self.scale_ref.fill_(float(step) / block)
                self.log_step.zero_()
        else:
            if self.channels is not None and x.numel() > 1:
                keep = keep_channel_scales and int(self.fit_bits) >= 0
                table, scales = fit_table_and_scales(
                    x,
                    2**b,
                    rounds=1 if keep else 2,
                    fix_zero=not signed,
                    scales=self._channel_scales() if keep else None,
                )
                self.channel_ref.copy_(scales)
                self.log_channel_scale.zero_()
            else:
                table = lloyd_levels(x, 2**b, fix_zero=not signed)
            self._set_fine_levels(fine_from_levels(table, block))
        self.initialized.fill_(True)
        self.fit_bits.fill_(b)
        self._fitted_to = _version_of(x_in)

    def fitted_to(self, x: torch.Tensor) -> bool:
        """Whether the levels were fitted to ``x`` as it is now, at the current bitwidth.

        Tracks the tensor's in-place version counter, which optimizer steps and
        ``load_state_dict`` bump, so a weight trained since its fit reads ``False``.
        """
        return (
            getattr(self, "_fitted_to", None) in (_version_of(x),)
            and _version_of(x) is not None
            and int(self.fit_bits) == self.bits
        )

    @torch.no_grad()
    def _set_fine_levels(self, fine: torch.Tensor) -> None:
        """Adaptive mode: set ``lo`` and the gaps so that ``fine_levels()`` returns ``fine``."""
        n = self.n_fine
        span = float(fine[-1] - fine[0])
        span = span if span > 1e-12 else 1e-6
        self.scale_ref.fill_(span)
        self.lo.fill_(float(fine[0]) / span)
        unit = span / (n - 1)
        gaps = (fine[1:] - fine[:-1]).double().clamp(min=1e-9 * span) / unit
        self.raw_gaps.copy_(_softplus_inv(gaps).float())

    @torch.no_grad()
    def init_range(self, lo: float, hi: float) -> None:
        """Spread the levels over ``[lo, hi]`` (``lo`` is raised to 0 when unsigned)."""
        if self.signed is None:
            self.signed_state.fill_(int(lo < 0))
        if not self.signed:
            lo, hi = 0.0, max(hi, 0.0)
        if hi - lo <= 1e-12:  # constant tensor: any small positive range will do
            hi = lo + max(abs(lo) * 1e-3, 1e-6)
        if self.channels is not None:
            raise ValueError(f"{self._label()}: init_range is per-tensor; use init_from")
        if self.mode == "adaptive":
            self.scale_ref.fill_(hi - lo)
            self.lo.fill_(lo / (hi - lo))
            self.raw_gaps.fill_(_SOFTPLUS_INV_ONE)
        else:
            b = self.bits
            if self.signed:
                step = max(-lo / 2 ** (b - 1), hi / max(2 ** (b - 1) - 1, 1))
            else:
                step = hi / (2**b - 1)
            self.scale_ref.fill_(step / 2 ** (self.max_bits - b))
            self.log_step.zero_()
        self.initialized.fill_(True)
        self.fit_bits.fill_(self.bits)

    def start_calibration(self) -> None:
        """Observe inputs (passing them through unquantized) until ``finish_calibration``."""
        self.calibrating = True
        self._observer = RangeObserver(self._label())
        if self.signed_from_data:  # e.g. decided "unsigned" by a stray forward on zeros
            self.signed_state.fill_(-1)

    def finish_calibration(self, method: str = "mse") -> None:
        """Fit the levels to what was observed (gathered over processes under DDP).

        ``method="mse"``: ``init_from`` on the observed subsample (MSE-searched step or
        Lloyd levels). ``method="percentile"``: spread the levels over the mean
        0.01%/99.99% quantiles (the earlier default, kept for comparison).
        """
        if self._observer is None:
            raise RuntimeError(f"{self._label()}: start_calibration() was not called")
        if method == "mse":
            self.init_from(self._observer.sample())
        elif method == "percentile":
            self.init_range(*self._observer.result())
        else:
            raise ValueError(f"calibration method must be 'mse' or 'percentile', got {method!r}")
        self.calibrating = False
        self._observer = None

    # ----------------------------------------------------------------- forward
    def _label(self) -> str:
        return f"quantizer {self.name!r}" if self.name else "DDQQuantizer"

    def _check_finite(self, x: torch.Tensor) -> None:
        if has_nonfinite(x):
            raise FloatingPointError(
                f"{self._label()}: input contains NaN or Inf; refusing to quantize it "
                "(it would poison the learned levels)"
            )

    def _level_grad_factor(self, numel: int, bits: int) -> float:
        if not self.grad_scale:
            return 1.0
        return 1.0 / math.sqrt(numel * (2**bits - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or x.numel() == 0:
            return x
        if self.calibrating:
            assert self._observer is not None
            self._observer.update(x)
            return x
        if self.training:
            self._check_finite(x)
            if not bool(self.initialized):
                self.init_from(x)
                self._broadcast_state()
        elif not bool(self.initialized):
            raise RuntimeError(
                f"{self._label()} was never initialised: calibrate it (ddq.calibrate) or run "
                "a training step before evaluating"
            )
        g = self.gates()
        # The one host sync per call: the bitwidth, with the bitwidth last fitted at.
        total, fitted = torch.stack([g.detach().sum(), self.fit_bits.to(g.dtype)]).tolist()
        if not math.isfinite(total):
            raise FloatingPointError(
                f"{self._label()}: gate logits are NaN or Inf (training diverged; a lower "
                "learning rate or a larger bit floor may help)"
            )
        bits = int(total)
        if self.refit_on_bits and bits != int(fitted):
            self.init_from(x, keep_channel_scales=True)  # the best levels at the new bits
        q = self.fine_levels(bits)
        v = self._merge(_scale_grad(q, self._level_grad_factor(x.numel(), bits)), g, bits)
        indexer = self._indexer(q, bits)
        if self.channels is None:
            return table_lookup(x, v.to(x.dtype), indexer)
        per_channel_numel = x.numel() // self.channels
        cs = _scale_grad(self._channel_scales(), self._level_grad_factor(per_channel_numel, bits))
        cs = cs.to(x.dtype).view(self._channel_shape(x))
        return table_lookup(x / cs, v.to(x.dtype), indexer) * cs

    def _broadcast_state(self) -> None:
        """Under DDP, take rank 0's levels: a quantizer first initialised inside a training
        forward (a branch calibration never reached) saw each process's own batch, and
        DDP does not re-broadcast parameters after it wraps the model."""
        if dist.is_available() and dist.is_initialized():
            with torch.no_grad():
                for t in [*self.parameters(), *self.buffers()]:
                    dist.broadcast(t.data, 0)

    def _indexer(self, q: torch.Tensor, bits: int) -> UniformIndexer | AdaptiveIndexer:
        if self.mode == "uniform":
            step = self._fine_step().detach()
            return UniformIndexer(1.0 / step, self._uniform_anchor(bits), self.n_fine)
        return AdaptiveIndexer(q.detach())

    def _channel_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        if x.dim() == 0 or x.shape[0] != self.channels:
            raise ValueError(
                f"{self._label()}: per-channel quantizer for {self.channels} channels got a "
                f"tensor of shape {tuple(x.shape)}"
            )
        return (-1,) + (1,) * (x.dim() - 1)

    @torch.no_grad()
    def indices(self, x: torch.Tensor) -> torch.Tensor:
        """The merged level index (``0..2**b - 1``, int64) of every element of ``x``.

        ``self(x)`` equals ``levels()[indices(x)]``, times the channel scale of each
        element's channel for a per-channel quantizer.

        Example:
            >>> qz = DDQQuantizer(max_bits=3, mode="uniform", signed=True)
            >>> qz.init_range(-4.0, 3.0); qz.set_bits(3)
            >>> qz.indices(torch.tensor([-4.0, 0.0, 2.9]))
            tensor([0, 4, 7])
        """
        bits = self.bits
        q = self.fine_levels(bits).detach()
        xs = x.detach()
        if self.channels is not None:
            xs = xs / self._channel_scales().to(xs.dtype).view(self._channel_shape(xs))
        fine, _ = self._indexer(q, bits)(xs, need_mask=False)
        return fine.long() // 2 ** (self.max_bits - bits)

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode}, bits={self.bits}, max_bits={self.max_bits}, "
            f"min_bits={self.min_bits}, signed={self.signed}"
            + (f", channels={self.channels}" if self.channels is not None else "")
            + (f", level_grid={self.level_grid}" if self.level_grid is not None else "")
        )
