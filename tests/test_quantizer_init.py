"""Per-channel quantizers, the data-driven start and re-fitting on bitwidth changes, each
against an independent oracle: PyTorch's per-channel fake-quantize op, autograd through an
explicit LSQ-style formulation, brute-force searches and Lloyd's optimality conditions."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddq import DDQQuantizer
from ddq.quantizer.fitting import (
    best_uniform_step,
    fine_from_levels,
    fit_table_and_scales,
    lloyd_levels,
    quantize_to_levels,
    uniform_quantize,
)


def _weights(seed: int = 0, c: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spread = torch.linspace(0.1, 3.0, c)[:, None, None, None]
    return torch.randn(c, 8, 3, 3, generator=g) * spread


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_per_channel_uniform_equals_per_channel_fake_quantize(bits):
    w = _weights()
    q = DDQQuantizer(max_bits=8, mode="uniform", signed=True, channels=16)
    q.set_bits(bits, trainable=True)
    q.init_from(w)
    step, zp = q.uniform_params()
    assert step == 2 ** (8 - bits) and zp == 2 ** (bits - 1)
    scale = step * q.channel_scales()
    x = w.clone().requires_grad_()
    y = q(x)
    ref_x = w.clone().requires_grad_()
    ref = torch.fake_quantize_per_channel_affine(
        ref_x, scale, torch.full((16,), zp, dtype=torch.int32), 0, 0, 2**bits - 1
    )
    t = (w / scale.view(-1, 1, 1, 1)).reshape(-1)
    away = ((t - t.floor() - 0.5).abs() > 1e-3).reshape(w.shape)  # near-ties may differ
    torch.testing.assert_close(y[away], ref[away], rtol=0, atol=1e-6)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref.backward(grad)
    # The gradient passes through x / s and * s: equal up to one rounding.
    torch.testing.assert_close(x.grad[away], ref_x.grad[away], rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["uniform", "adaptive"])
def test_channel_scale_gradient_matches_explicit_lsq_form(mode):
    """d/d(log scale) through the quantizer equals autograd through s * Q(x / s) written out
    with a straight-through rounding (LSQ's step-size gradient, times s for the log)."""
    w = _weights(1, 4)
    q = DDQQuantizer(max_bits=4, mode=mode, signed=True, channels=4, grad_scale=False)
    q.init_from(w)
    with torch.no_grad():
        q.log_channel_scale.copy_(torch.tensor([0.1, -0.2, 0.05, 0.3]))
    y = q(w)
    grad = torch.randn_like(y)
    (y * grad).sum().backward()
    levels = q.levels()
    log_s = q.log_channel_scale.detach().clone().requires_grad_()
    s = (q.channel_ref * torch.exp(log_s)).view(-1, 1, 1, 1)
    z = w / s
    mid = (levels[1:] + levels[:-1]) / 2
    hard = levels[torch.bucketize(z.detach(), mid)]
    inside = (z.detach() >= levels[0] - (levels[1] - levels[0]) / 2) & (
        z.detach() <= levels[-1] + (levels[-1] - levels[-2]) / 2
    )
    zq = hard + torch.where(inside, z - z.detach(), torch.zeros_like(z))
    ((zq * s) * grad).sum().backward()
    if mode == "uniform":  # the fine grid's half-step range is the 8-level grid's here
        torch.testing.assert_close(q.log_channel_scale.grad, log_s.grad, rtol=1e-4, atol=1e-5)
    else:
        # Adaptive clamps at half a *fine* step outside the table, a hair narrower than
        # half a level gap; elements that far out are rare on Gaussian weights.
        torch.testing.assert_close(q.log_channel_scale.grad, log_s.grad, rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("mode", ["uniform", "adaptive"])
@pytest.mark.parametrize("channels", [None, 16])
def test_dequantization_is_table_times_channel_scale_bit_exact(mode, channels):
    w = _weights(2)
    q = DDQQuantizer(max_bits=8, mode=mode, signed=True, channels=channels)
    q.init_from(w)
    q.set_bits(3, trainable=True)
    y = q(w)
    idx = q.indices(w)
    assert idx.min() >= 0 and idx.max() <= 7
    rec = q.levels()[idx]
    if channels is not None:
        rec = rec * q.channel_scales().view(-1, 1, 1, 1)
    assert torch.equal(rec, y.detach())


def test_best_uniform_step_matches_brute_force():
    x = torch.randn(4000, generator=torch.Generator().manual_seed(3))
    for bits in (2, 3, 4):
        step = float(best_uniform_step(x, bits, signed=True))
        grid = torch.linspace(0.01, 2.0, 4000)
        errs = torch.stack([(uniform_quantize(x, s, bits, True) - x).square().mean() for s in grid])
        assert float((uniform_quantize(x, torch.tensor(step), bits, True) - x).square().mean()) <= (
            float(errs.min()) * 1.002
        )


@settings(max_examples=25, deadline=None)
@given(n_levels=st.sampled_from([2, 4, 8, 16]), seed=st.integers(0, 10_000),
       skew=st.floats(0.2, 3.0))  # fmt: skip
def test_lloyd_levels_satisfy_the_optimality_conditions(n_levels, seed, skew):
    """Each level is the mean of the data nearest to it (the centroid condition)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3000, generator=g).double()
    x = torch.sign(x) * x.abs() ** skew
    levels = lloyd_levels(x, n_levels, iters=200).double()
    assert torch.all(levels[1:] > levels[:-1])
    cell = torch.bucketize(x, (levels[1:] + levels[:-1]) / 2)
    for j in range(n_levels):
        members = x[cell == j]
        if members.numel():
            assert float(levels[j]) == pytest.approx(
                float(members.mean()), abs=2e-3 * float(x.std())
            )


def test_lloyd_beats_every_uniform_grid_and_pins_zero():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(4)) ** 3
    for bits in (2, 3, 4):
        km = (quantize_to_levels(x, lloyd_levels(x, 2**bits)) - x).square().mean()
        step = best_uniform_step(x, bits, signed=True)
        uni = (uniform_quantize(x, step, bits, True) - x).square().mean()
        assert km < uni
    relu = torch.relu(torch.randn(5000))
    levels = lloyd_levels(relu, 8, fix_zero=True)
    assert float(levels[0]) == 0.0


def test_fine_levels_average_to_the_targets_and_stay_sorted():
    target = torch.tensor([-2.0, -0.5, 0.0, 0.3, 4.0])
    fine = fine_from_levels(target, 8)
    assert torch.all(fine[1:] > fine[:-1])
    torch.testing.assert_close(fine.view(5, 8).mean(1), target, rtol=0, atol=1e-6)


@pytest.mark.parametrize("channels", [None, 16])
def test_adaptive_start_is_k_means_quality_and_beats_the_best_uniform_grid(channels):
    w = _weights(5)
    q = DDQQuantizer(max_bits=8, mode="adaptive", signed=True, channels=channels)
    q.set_bits(3, trainable=True)
    q.init_from(w)
    mse = float((q(w).detach() - w).square().mean())
    axis = 0 if channels else None
    step = best_uniform_step(w, 3, True, channel_axis=axis)
    rows = w.reshape(16, -1) if channels else w
    uni = float((uniform_quantize(rows, step[:, None] if channels else step, 3, True) - rows)
                .square().mean())  # fmt: skip
    if channels:
        table, scales = fit_table_and_scales(w, 8)
        km = float((quantize_to_levels(rows / scales[:, None], table) * scales[:, None] - rows)
                   .square().mean())  # fmt: skip
    else:
        km = float((quantize_to_levels(w, lloyd_levels(w, 8)) - w).square().mean())
    assert mse < 0.95 * uni
    assert mse == pytest.approx(km, rel=0.02)


@pytest.mark.parametrize("mode", ["uniform", "adaptive"])
def test_weight_quantizer_refits_when_its_bitwidth_changes(mode):
    """After the bitwidth drops 8 -> 3 (gates or the budget fit), the next forward re-fits
    the levels to the weight at 3 bits instead of merging the 8-bit ones."""
    w = torch.randn(2000, generator=torch.Generator().manual_seed(6)) ** 3  # heavy tails
    q = DDQQuantizer(max_bits=8, mode=mode, signed=True, refit_on_bits=True)
    q.init_from(w)
    q.set_bits(3, trainable=True)
    merged = float((q.levels()[q.indices(w)] - w).square().mean())
    mse = float((q(w).detach() - w).square().mean())
    assert int(q.fit_bits) == 3
    fresh = DDQQuantizer(max_bits=8, mode=mode, signed=True)
    fresh.set_bits(3, trainable=True)
    fresh.init_from(w)
    assert mse == pytest.approx(float((fresh(w).detach() - w).square().mean()), rel=1e-5)
    assert mse < merged
    # An activation quantizer (no refit) keeps its learned levels.
    a = DDQQuantizer(max_bits=8, mode=mode, signed=True)
    a.init_from(w)
    a.set_bits(3, trainable=True)
    before = a.levels().clone()
    a(w)
    assert torch.equal(a.levels(), before)


def test_per_channel_quantizer_rejects_a_tensor_of_the_wrong_shape():
    q = DDQQuantizer(max_bits=4, mode="uniform", channels=16)
    with pytest.raises(ValueError, match="16 channels"):
        q.init_from(torch.randn(8, 3))


def test_old_checkpoints_without_fit_bits_load_at_their_bits():
    q = DDQQuantizer(max_bits=8, mode="uniform", refit_on_bits=True)
    q.init_from(torch.randn(100))
    q.set_bits(5, trainable=True)
    state = {k: v for k, v in q.state_dict().items() if k != "fit_bits"}
    fresh = DDQQuantizer(max_bits=8, mode="uniform", refit_on_bits=True)
    fresh.load_state_dict(state)
    assert int(fresh.fit_bits) == 5


def test_fits_on_a_column_subsample_of_large_weights_lose_almost_nothing():
    # The start of a large layer is fitted on a strided subset of each channel's columns
    # (fitting.FIT_MAX_ELEMENTS, >= 1024 per channel); measured on all the weights, it must
    # stay within a few percent of the fit that saw them all.
    torch.manual_seed(11)  # Distribution.sample draws from the global generator
    laplace = torch.distributions.Laplace(0.0, 1.0)
    w = laplace.sample((16, 4000)) * torch.linspace(0.2, 2.0, 16)[:, None]
    cap = 16_000  # asks for 1/4 of the 64,000 weights; the 1024-column floor keeps 1/3
    full = fit_table_and_scales(w, 8, max_elements=None)
    sub = fit_table_and_scales(w, 8, max_elements=cap)
    err_full, err_sub = (
        float((quantize_to_levels(w / s[:, None], t) * s[:, None] - w).square().mean())
        for t, s in (full, sub)
    )
    assert err_sub != err_full  # the subsample was used
    assert err_sub < 1.03 * err_full
    step_full = best_uniform_step(w, 4, True, channel_axis=0, max_elements=None)
    step_sub = best_uniform_step(w, 4, True, channel_axis=0, max_elements=cap)
    mse = [float(_uniform_err(w, s)) for s in (step_full, step_sub)]
    assert mse[0] <= mse[1] < 1.03 * mse[0]
    # Below the cap nothing is subsampled: the same numbers exactly.
    assert torch.equal(
        best_uniform_step(w, 4, True, channel_axis=0, max_elements=w.numel()), step_full
    )


def _uniform_err(w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return (uniform_quantize(w, step[:, None], 4, True) - w).square().mean()


def test_refit_with_kept_scales_survives_weights_far_from_them():
    # A diverged run (CI's zoo check once: 2-image BatchNorm, weights past 1e13) re-fits at
    # a new bitwidth with channel scales still near 0.1. The table then sits near 1e20,
    # whose squares overflow float32: the scales must come out finite, not NaN.
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 64, generator=g) * 1e19
    table, scales = fit_table_and_scales(w, 128, rounds=1, scales=torch.full((8,), 0.1))
    assert torch.isfinite(table).all() and torch.isfinite(scales).all()
    assert bool((scales > 0).all())
    q = quantize_to_levels(w / scales[:, None], table) * scales[:, None]
    assert float((q - w).square().mean()) < 1e-3 * float(w.square().mean())
