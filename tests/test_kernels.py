"""Tests for ddq.deploy.kernels against float references (F.linear / F.conv2d)."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ddq.deploy import kernels
from ddq.deploy.kernels import int_conv2d, int_gemm, int_linear, lut_conv2d, lut_linear

SETTINGS = settings(max_examples=40, deadline=None)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randidx(shape: tuple[int, ...], bits: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.int64).to(torch.uint8)


class UniformCase:
    """Random uniform-grid quantized operands plus their float64 decodings."""

    def __init__(self, gen: torch.Generator, o: int, x_bits: int, w_bits: int, signed: bool):
        self.sx = float(torch.rand((), generator=gen, dtype=torch.float64)) + 0.05
        self.zx = (1 << (x_bits - 1)) if signed else 0
        self.ox = float(torch.randn((), generator=gen, dtype=torch.float64))
        self.sw = torch.rand(o, generator=gen, dtype=torch.float64) + 0.05
        # Per-channel zero points, anywhere on (or just off) the grid.
        self.zw = torch.randint(-1, (1 << w_bits) + 1, (o,), generator=gen)
        self.ow = torch.randn(o, generator=gen, dtype=torch.float64)
        self.bias = torch.randn(o, generator=gen, dtype=torch.float64)
        self.mult = torch.randn(o, generator=gen, dtype=torch.float64)
        self.add = torch.randn(o, generator=gen, dtype=torch.float64)

    def x(self, x_idx: torch.Tensor, offset: bool) -> torch.Tensor:
        return self.sx * (x_idx.double() - self.zx) + (self.ox if offset else 0.0)

    def w(self, w_idx: torch.Tensor, offset: bool) -> torch.Tensor:
        view = (-1,) + (1,) * (w_idx.dim() - 1)
        w = self.sw.view(view) * (w_idx.double() - self.zw.view(view))
        return w + self.ow.view(view) if offset else w


# ---------------------------------------------------------------------------------------------
# int_gemm / int_linear
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 6),
    o=st.integers(1, 9),
    k=st.integers(1, 40),
    x_bits=st.integers(1, 8),
    w_bits=st.integers(1, 8),
    per_channel=st.booleans(),
)
def test_int_gemm_exact(
    seed: int, n: int, o: int, k: int, x_bits: int, w_bits: int, per_channel: bool
) -> None:
    gen = _gen(seed)
    x_idx = _randidx((n, k), x_bits, gen)
    w_idx = _randidx((o, k), w_bits, gen)
    zx = int(torch.randint(0, 1 << x_bits, (), generator=gen))
    zw = torch.randint(0, 1 << w_bits, (o,) if per_channel else (), generator=gen)
    acc = int_gemm(x_idx, zx, w_idx, zw)
    ref = (x_idx.long() - zx) @ (w_idx.long() - zw.view(-1, 1)).t()
    assert acc.dtype == torch.int64
    assert torch.equal(acc, ref)


def test_int_gemm_large_values_use_exact_int64_path() -> None:
    # max|x| * max|w| * K > 2**53: the float64 shortcut would round, the int64 path must not.
    gen = _gen(0)
    x = torch.randint(2**25, 2**26, (3, 64), generator=gen)
    w = torch.randint(2**25, 2**26, (5, 64), generator=gen)
    ref = (x - 7) @ (w + 3).t()
    assert int(ref.abs().max()) > 2**53  # the float64 shortcut would not be exact here
    assert torch.equal(int_gemm(x, 7, w, -3), ref)
    with pytest.raises(ValueError, match="overflow"):
        int_gemm(torch.full((1, 4), 2**40), 0, torch.full((1, 4), 2**40), 0)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    o=st.integers(1, 9),
    k=st.integers(1, 40),
    x_bits=st.integers(1, 8),
    w_bits=st.integers(1, 8),
    signed=st.booleans(),
    offsets=st.booleans(),
    epilogue=st.booleans(),
)
def test_int_linear_matches_float_reference(
    seed: int,
    batch: list[int],
    o: int,
    k: int,
    x_bits: int,
    w_bits: int,
    signed: bool,
    offsets: bool,
    epilogue: bool,
) -> None:
    gen = _gen(seed)
    q = UniformCase(gen, o, x_bits, w_bits, signed)
    x_idx = _randidx((*batch, k), x_bits, gen)
    w_idx = _randidx((o, k), w_bits, gen)
    extra = dict(x_offset=q.ox, w_offset=q.ow) if offsets else {}
    if epilogue:
        extra.update(mult=q.mult, add=q.add)
    y = int_linear(x_idx, q.sx, q.zx, w_idx, q.sw, q.zw, q.bias, out_dtype=torch.float64, **extra)
    ref = F.linear(q.x(x_idx, offsets), q.w(w_idx, offsets), q.bias)
    if epilogue:
        ref = ref * q.mult + q.add
    assert y.shape == (*batch, o)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_int_linear_defaults_and_scalar_params() -> None:
    gen = _gen(1)
    x_idx = _randidx((4, 10), 4, gen)
    w_idx = _randidx((3, 10), 3, gen)
    y = int_linear(x_idx, torch.tensor(0.5), torch.tensor(8.0), w_idx, 0.25, 4)
    assert y.dtype == torch.float32
    ref = F.linear(0.5 * (x_idx.double() - 8), 0.25 * (w_idx.double() - 4))
    torch.testing.assert_close(y, ref.float())
    # Unsigned grid + generic offset form: level_j = offset + scale * j.
    y = int_linear(x_idx, 0.1, 0, w_idx, 0.2, 0, x_offset=0.3, w_offset=-0.7)
    ref = F.linear(0.3 + 0.1 * x_idx.double(), -0.7 + 0.2 * w_idx.double())
    torch.testing.assert_close(y, ref.float())


# ---------------------------------------------------------------------------------------------
# lut_linear
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    o=st.integers(1, 9),
    k=st.integers(1, 40),
    bits=st.integers(1, 8),
    per_channel=st.booleans(),
    channel_scale=st.booleans(),
    chunk=st.sampled_from([1, 7, 64, 1 << 22]),
    epilogue=st.booleans(),
)
def test_lut_linear_matches_float_reference(
    seed: int,
    batch: list[int],
    o: int,
    k: int,
    bits: int,
    per_channel: bool,
    channel_scale: bool,
    chunk: int,
    epilogue: bool,
) -> None:
    gen = _gen(seed)
    x = torch.randn((*batch, k), generator=gen, dtype=torch.float64)
    w_idx = _randidx((o, k), bits, gen)
    levels = 1 << bits
    if per_channel:
        table = torch.randn((o, levels), generator=gen, dtype=torch.float64)
        w = torch.gather(table, 1, w_idx.long())
    else:
        table = torch.randn(levels, generator=gen, dtype=torch.float64)
        w = table[w_idx.long()]
    # DDQ's per-channel weights: a shared normalised table times one scale per channel.
    scale = torch.rand(o, generator=gen, dtype=torch.float64) + 0.1 if channel_scale else None
    if scale is not None:
        w = w * scale.view(-1, 1)
    bias = torch.randn(o, generator=gen, dtype=torch.float64)
    mult = torch.randn(o, generator=gen, dtype=torch.float64) if epilogue else None
    add = torch.randn(o, generator=gen, dtype=torch.float64) if epilogue else None
    y = lut_linear(
        x, w_idx, table, bias, w_scale=scale, mult=mult, add=add, max_chunk_elements=chunk
    )
    ref = F.linear(x, w, bias)
    if epilogue:
        ref = ref * mult + add
    assert y.shape == (*batch, o)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_lut_linear_float32_and_dtype_promotion() -> None:
    gen = _gen(2)
    x = torch.randn(5, 300, generator=gen)
    w_idx = _randidx((7, 300), 4, gen)
    table = torch.randn(16, generator=gen)
    y = lut_linear(x, w_idx, table)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, table[w_idx.long()]), rtol=1e-4, atol=1e-4)
    y64 = lut_linear(x, w_idx, table.double())
    assert y64.dtype == torch.float64
    # Tables need not have a power-of-two size; unused levels are fine.
    y = lut_linear(x.double(), w_idx, torch.randn(20, generator=gen, dtype=torch.float64))
    assert y.shape == (5, 7)


# ---------------------------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------------------------


@st.composite
def conv_geometry(draw: st.DrawFn) -> dict:
    depthwise = draw(st.booleans())
    groups = draw(st.integers(1, 4))
    if depthwise:
        cg, og = 1, draw(st.integers(1, 2))  # channel multiplier 1 or 2
    else:
        cg, og = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    # Smallest input for which the dilated kernel fits the padded input.
    min_h = max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0])
    min_w = max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1])
    return dict(
        n=draw(st.integers(1, 2)),
        c=cg * groups,
        o=og * groups,
        h=draw(st.integers(min_h, min_h + 5)),
        w=draw(st.integers(min_w, min_w + 5)),
        kernel=(kh, kw),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        cg=cg,
    )


def _conv_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, g: dict) -> torch.Tensor:
    return F.conv2d(x, w, bias, g["stride"], g["padding"], g["dilation"], g["groups"])


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    g=conv_geometry(),
    x_bits=st.integers(1, 8),
    w_bits=st.integers(1, 8),
    signed=st.booleans(),
    offsets=st.booleans(),
    epilogue=st.booleans(),
)
def test_int_conv2d_matches_conv2d(
    seed: int, g: dict, x_bits: int, w_bits: int, signed: bool, offsets: bool, epilogue: bool
) -> None:
    gen = _gen(seed)
    q = UniformCase(gen, g["o"], x_bits, w_bits, signed)
    x_idx = _randidx((g["n"], g["c"], g["h"], g["w"]), x_bits, gen)
    w_idx = _randidx((g["o"], g["cg"], *g["kernel"]), w_bits, gen)
    extra = dict(x_offset=q.ox, w_offset=q.ow) if offsets else {}
    if epilogue:
        extra.update(mult=q.mult, add=q.add)
    y = int_conv2d(
        x_idx,
        q.sx,
        q.zx,
        w_idx,
        q.sw,
        q.zw,
        q.bias,
        g["stride"],
        g["padding"],
        g["dilation"],
        g["groups"],
        out_dtype=torch.float64,
        **extra,
    )
    # Padding is zero in the real domain, also when x_offset != 0.
    ref = _conv_ref(q.x(x_idx, offsets), q.w(w_idx, offsets), q.bias, g)
    if epilogue:
        ref = ref * q.mult.view(1, -1, 1, 1) + q.add.view(1, -1, 1, 1)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    g=conv_geometry(),
    bits=st.integers(1, 8),
    per_channel=st.booleans(),
    channel_scale=st.booleans(),
    chunk=st.sampled_from([5, 100, 1 << 22]),
)
def test_lut_conv2d_matches_conv2d(
    seed: int, g: dict, bits: int, per_channel: bool, channel_scale: bool, chunk: int
) -> None:
    gen = _gen(seed)
    x = torch.randn((g["n"], g["c"], g["h"], g["w"]), generator=gen, dtype=torch.float64)
    w_idx = _randidx((g["o"], g["cg"], *g["kernel"]), bits, gen)
    levels = 1 << bits
    if per_channel:
        table = torch.randn((g["o"], levels), generator=gen, dtype=torch.float64)
        w = torch.gather(table, 1, w_idx.long().reshape(g["o"], -1)).reshape(w_idx.shape)
    else:
        table = torch.randn(levels, generator=gen, dtype=torch.float64)
        w = table[w_idx.long()]
    scale = torch.rand(g["o"], generator=gen, dtype=torch.float64) + 0.1 if channel_scale else None
    if scale is not None:
        w = w * scale.view(-1, 1, 1, 1)
    bias = torch.randn(g["o"], generator=gen, dtype=torch.float64)
    mult = torch.randn(g["o"], generator=gen, dtype=torch.float64)
    y = lut_conv2d(
        x,
        w_idx,
        table,
        bias,
        g["stride"],
        g["padding"],
        g["dilation"],
        g["groups"],
        w_scale=scale,
        mult=mult,
        add=0.5,
        max_chunk_elements=chunk,
    )
    ref = _conv_ref(x, w, bias, g) * mult.view(1, -1, 1, 1) + 0.5
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_depthwise_float32_realistic_shape() -> None:
    # A MobileNet-like depthwise 3x3, stride 2, with 4-bit per-channel tables, in float32.
    gen = _gen(3)
    x = torch.randn(2, 32, 14, 14, generator=gen)
    w_idx = _randidx((32, 1, 3, 3), 4, gen)
    table = torch.randn(32, 16, generator=gen)
    w = torch.gather(table, 1, w_idx.long().reshape(32, -1)).reshape(w_idx.shape)
    y = lut_conv2d(x, w_idx, table, stride=2, padding=1, groups=32)
    torch.testing.assert_close(y, F.conv2d(x, w, stride=2, padding=1, groups=32))
    x_idx = _randidx((2, 32, 14, 14), 8, gen)
    y = int_conv2d(x_idx, 0.02, 0, w_idx, 0.1, 8, stride=2, padding=1, groups=32)
    ref = F.conv2d(0.02 * x_idx.double(), 0.1 * (w_idx.double() - 8), None, 2, 1, 1, 32)
    torch.testing.assert_close(y, ref.float())


def test_per_channel_weights_float32_depthwise_and_pointwise() -> None:
    """DDQ's per-channel layout in float32: one normalised table (or integer grid) per layer
    times one scale per output channel, through both kernel families."""
    gen = _gen(4)
    x = torch.randn(2, 16, 9, 9, generator=gen)
    scale = torch.rand(16, generator=gen) + 0.05
    w_idx = _randidx((16, 1, 3, 3), 3, gen)
    table = torch.sort(torch.randn(8, generator=gen)).values
    w = table[w_idx.long()] * scale.view(-1, 1, 1, 1)  # what the quantizer produces
    y = lut_conv2d(x, w_idx, table, stride=2, padding=1, groups=16, w_scale=scale)
    torch.testing.assert_close(y, F.conv2d(x, w, stride=2, padding=1, groups=16))
    # Uniform per-channel: normalised grid step * (j - Z), integer step = step * scale[c].
    step, zero = 2.0**5, 4
    x_idx = _randidx((2, 16, 9, 9), 6, gen)
    pw_idx = _randidx((8, 16, 1, 1), 3, gen)
    pw_scale = torch.rand(8, generator=gen) + 0.05
    y = int_conv2d(x_idx, 0.03, 32, pw_idx, step * pw_scale.double(), zero)
    w = (step * (pw_idx.float() - zero)) * pw_scale.view(-1, 1, 1, 1)
    ref = F.conv2d(0.03 * (x_idx.double() - 32), w.double())
    torch.testing.assert_close(y, ref.float())


@pytest.mark.parametrize("family", [kernels.integer, kernels.lut])
def test_doctests(family) -> None:
    failures, tried = doctest.testmod(family, verbose=False)
    assert failures == 0 and tried > 0


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def test_linear_validation() -> None:
    x_idx = torch.zeros(2, 4, dtype=torch.uint8)
    w_idx = torch.zeros(3, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="integer dtype"):
        int_linear(x_idx.float(), 1.0, 0, w_idx, 1.0, 0)
    with pytest.raises(ValueError, match="integer dtype"):
        int_gemm(x_idx, 0, w_idx.float(), 0)
    with pytest.raises(ValueError, match="in_features=4"):
        int_linear(torch.zeros(2, 5, dtype=torch.uint8), 1.0, 0, w_idx, 1.0, 0)
    with pytest.raises(ValueError, match="2-D"):
        int_linear(x_idx, 1.0, 0, w_idx.view(3, 2, 2), 1.0, 0)
    with pytest.raises(ValueError, match=r"w_scale.*3 elements"):
        int_linear(x_idx, 1.0, 0, w_idx, torch.ones(2), 0)
    with pytest.raises(ValueError, match=r"w_zero.*integer-valued"):
        int_linear(x_idx, 1.0, 0, w_idx, 1.0, 0.5)
    with pytest.raises(ValueError, match=r"x_scale.*per-tensor"):
        int_linear(x_idx, torch.ones(2), 0, w_idx, 1.0, 0)
    with pytest.raises(ValueError, match=r"x_zero.*per-tensor"):
        int_linear(x_idx, 1.0, torch.zeros(2), w_idx, 1.0, 0)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        int_linear(x_idx, 1.0, 0, w_idx, 1.0, 0, torch.zeros(4))
    with pytest.raises(ValueError, match="mult"):
        int_linear(x_idx, 1.0, 0, w_idx, 1.0, 0, mult=torch.ones(4))

    x = torch.zeros(2, 4)
    table = torch.zeros(4)
    with pytest.raises(ValueError, match="floating-point"):
        lut_linear(x_idx, w_idx, table)
    with pytest.raises(ValueError, match="floating-point"):
        lut_linear(x, w_idx, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer dtype"):
        lut_linear(x, w_idx.float(), table)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        lut_linear(x, w_idx + 4, table)
    with pytest.raises(ValueError, match="per output channel"):
        lut_linear(x, w_idx, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="in_features=4"):
        lut_linear(torch.zeros(2, 3), w_idx, table)
    with pytest.raises(ValueError, match="max_chunk_elements"):
        lut_linear(x, w_idx, table, max_chunk_elements=0)
    with pytest.raises(ValueError, match=r"w_scale.*3 elements"):
        lut_linear(x, w_idx, table, w_scale=torch.ones(4))
    with pytest.raises(ValueError, match="w_scale must be finite"):
        lut_linear(x, w_idx, table, w_scale=torch.tensor([1.0, float("nan"), 1.0]))


def test_conv_validation() -> None:
    x_idx = torch.zeros(1, 4, 5, 5, dtype=torch.uint8)
    w_idx = torch.zeros(6, 2, 3, 3, dtype=torch.uint8)
    x = torch.zeros(1, 4, 5, 5)
    table = torch.zeros(4)
    with pytest.raises(ValueError, match="4-D"):
        int_conv2d(x_idx[0], 1.0, 0, w_idx, 1.0, 0, groups=2)
    with pytest.raises(ValueError, match="4-D"):
        lut_conv2d(x, w_idx[0], table, groups=2)
    with pytest.raises(ValueError, match="divisible by groups"):
        int_conv2d(x_idx, 1.0, 0, w_idx, 1.0, 0, groups=3)
    with pytest.raises(ValueError, match="input channels per group"):
        lut_conv2d(x, w_idx, table, groups=1)
    with pytest.raises(ValueError, match="stride"):
        lut_conv2d(x, w_idx, table, stride=0, groups=2)
    with pytest.raises(ValueError, match="padding"):
        int_conv2d(x_idx, 1.0, 0, w_idx, 1.0, 0, padding=-1, groups=2)
    with pytest.raises(ValueError, match="does not fit"):
        lut_conv2d(x, w_idx, table, dilation=3, groups=2)
    with pytest.raises(ValueError, match="groups"):
        lut_conv2d(x, w_idx, table, groups=0)
    with pytest.raises(ValueError, match=r"w_scale.*6 elements"):
        lut_conv2d(x, w_idx, table, groups=2, w_scale=torch.ones(2))
    with pytest.raises(ValueError, match="integer dtype"):
        int_conv2d(x, 1.0, 0, w_idx, 1.0, 0, groups=2)
