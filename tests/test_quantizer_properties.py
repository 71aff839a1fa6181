"""Properties of DDQQuantizer (hypothesis), learning behaviour and bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddq import DDQQuantizer

floats = st.floats(-50, 50, allow_nan=False, width=32)


@st.composite
def quantizers(draw):
    k = draw(st.integers(2, 8))
    mode = draw(st.sampled_from(["adaptive", "uniform"]))
    signed = draw(st.booleans())
    q = DDQQuantizer(max_bits=k, min_bits=1, mode=mode, signed=signed)
    lo = draw(st.floats(-10, 0)) if signed else 0.0
    hi = draw(st.floats(0.01, 10))
    q.init_range(lo, hi)
    if mode == "adaptive":
        seed = draw(st.integers(0, 2**16))
        with torch.no_grad():
            q.raw_gaps.add_(
                torch.randn(q.raw_gaps.shape, generator=torch.Generator().manual_seed(seed))
            )
    q.set_bits(draw(st.integers(1, k)), trainable=True)
    return q


@settings(max_examples=60, deadline=None)
@given(quantizers(), st.lists(floats, min_size=1, max_size=200))
def test_outputs_are_levels_idempotent_and_at_most_2b_values(q, xs):
    x = torch.tensor(xs)
    y = q(x).detach()
    levels = q.levels()
    assert levels.numel() == 2**q.bits
    assert torch.all(levels[1:] >= levels[:-1])
    assert torch.isin(y, levels).all()
    assert torch.equal(q(y).detach(), y)
    assert y.unique().numel() <= 2**q.bits


@settings(max_examples=60, deadline=None)
@given(quantizers(), st.lists(floats, min_size=2, max_size=200))
def test_monotone(q, xs):
    x = torch.sort(torch.tensor(xs)).values
    y = q(x).detach()
    assert torch.all(y[1:] >= y[:-1])


@pytest.mark.parametrize("mode", ["adaptive", "uniform"])
def test_levels_stay_sorted_under_large_learning_rate(mode):
    q = DDQQuantizer(max_bits=6, mode=mode, grad_scale=False)
    x = torch.randn(4096)
    q.init_from(x)
    opt = torch.optim.Adam(q.parameters(), lr=1.0)  # ~100x a usual level lr
    target = torch.randn(4096) * 5
    for _ in range(200):
        opt.zero_grad()
        ((q(x) - target) ** 2).mean().backward()
        opt.step()
    fine = q.fine_levels().detach()
    assert torch.isfinite(fine).all()
    assert torch.all(fine[1:] >= fine[:-1])
    assert torch.all(q.levels()[1:] >= q.levels()[:-1])


@pytest.mark.parametrize("mode", ["adaptive", "uniform"])
def test_a_loss_that_needs_finer_levels_opens_a_gate(mode):
    q = DDQQuantizer(max_bits=8, min_bits=2, mode=mode)
    x = torch.randn(8192)
    q.init_from(x)
    q.set_bits(2, trainable=True)
    opt = torch.optim.Adam([q.gate_logits], lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        ((q(x) - x) ** 2).mean().backward()
        opt.step()
    assert q.bits > 2


@pytest.mark.parametrize("mode", ["adaptive", "uniform"])
def test_a_pull_toward_fewer_bits_closes_a_gate(mode):
    q = DDQQuantizer(max_bits=8, min_bits=2, mode=mode)
    x = torch.randn(8192)
    q.init_from(x)
    opt = torch.optim.Adam([q.gate_logits], lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        (((q(x) - x) ** 2).mean() + 0.1 * q.bits_tensor()).backward()
        opt.step()
    assert 2 <= q.bits < 8


def test_fixed_bits_do_not_move():
    q = DDQQuantizer(max_bits=8, mode="adaptive")
    x = torch.randn(1024)
    q.init_from(x)
    q.set_bits(4, trainable=False)
    opt = torch.optim.Adam(q.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        (((q(x) - x) ** 2).mean() - 10 * q.bits_tensor()).backward()
        opt.step()
    assert q.bits == 4


def test_nan_or_inf_in_training_names_the_quantizer_and_leaves_levels_intact():
    q = DDQQuantizer()
    q.name = "features.3.conv.input"
    q.init_from(torch.randn(100))
    before = q.fine_levels().detach().clone()
    for bad in (float("nan"), float("inf")):
        x = torch.randn(100)
        x[7] = bad
        with pytest.raises(FloatingPointError, match=r"features\.3\.conv\.input"):
            q(x)
    torch.testing.assert_close(q.fine_levels().detach(), before)


def test_diverged_gate_logits_name_the_quantizer():
    q = DDQQuantizer()
    q.name = "features.5.conv.weight"
    q.init_from(torch.randn(100))
    with torch.no_grad():
        q.gate_logits[3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"features\.5\.conv\.weight.*diverged"):
        q(torch.randn(100))


def test_empty_tensor_passes_through():
    q = DDQQuantizer()
    x = torch.empty(0, 3)
    assert q(x).shape == (0, 3)


def test_eval_without_initialisation_is_a_clear_error():
    q = DDQQuantizer().eval()
    q.name = "fc.input"
    with pytest.raises(RuntimeError, match=r"fc\.input.*calibrate"):
        q(torch.randn(3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_bits": 0}, "max_bits"),
        ({"max_bits": 9}, "max_bits"),
        ({"max_bits": 4, "min_bits": 5}, "min_bits"),
        ({"mode": "log"}, "mode"),
    ],
)
def test_invalid_settings_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DDQQuantizer(**kwargs)


def test_unsigned_quantizer_levels_are_non_negative():
    for mode in ("adaptive", "uniform"):
        q = DDQQuantizer(mode=mode, signed=None)
        q.init_from(torch.rand(100))
        assert q.signed is False
        assert q.levels().min() >= 0


@pytest.mark.parametrize("mode", ["adaptive", "uniform"])
def test_unsigned_zero_is_an_exact_level_at_every_bitwidth(mode):
    # ReLU outputs are mostly exact zeros: a grid that cannot represent 0 shifts all of
    # them (at 3-4 bits that broke a calibrated MobileNetV2 before any training).
    q = DDQQuantizer(max_bits=8, min_bits=1, mode=mode, signed=False)
    x = torch.cat([torch.zeros(50), torch.rand(200) * 6])
    q.init_from(x)
    with torch.no_grad():  # uneven gaps, as after training
        if mode == "adaptive":
            q.raw_gaps.add_(torch.linspace(-1, 1, q.raw_gaps.numel()))
    for bits in range(1, 9):
        q.set_bits(bits, trainable=True)
        levels = q.levels()
        assert levels.numel() == 2**bits and levels[0].item() == 0.0, bits
        y = q(x)
        assert torch.all(y[:50] == 0), bits
        assert torch.all(levels[1:] > 0) and torch.all(levels.diff() > 0), bits


def test_calibration_sets_range_from_batches():
    q = DDQQuantizer(max_bits=8, mode="uniform", signed=None)
    q.start_calibration()
    x = torch.rand(10000) * 4
    assert torch.equal(q(x), x)  # observes, does not quantize
    q.finish_calibration()
    assert q.signed is False
    assert q.levels().max() == pytest.approx(4.0, rel=0.01)
