"""Adaptive levels onto per-channel int8 grids (ddq.deploy.int8_codes), against PyTorch's
own per-channel fake-quantize op as the oracle."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddq.deploy.int8_codes import adaptive_to_int8


def _layer(seed: int, bits: int, channels: int, per_channel: bool):
    g = torch.Generator().manual_seed(seed)
    table = torch.sort(torch.randn(2**bits, generator=g)).values
    idx = torch.randint(0, 2**bits, (channels, 3, 3, 3), generator=g)
    scales = torch.rand(channels, generator=g) + 0.05 if per_channel else None
    return table, idx, scales


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    bits=st.integers(1, 8),
    channels=st.integers(1, 6),
    per_channel=st.booleans(),
)
def test_matches_torch_fake_quantize_per_channel(seed, bits, channels, per_channel):
    table, idx, scales = _layer(seed, bits, channels, per_channel)
    w = adaptive_to_int8(table, idx, scales)
    adaptive = table[idx] * (scales.view(-1, 1, 1, 1) if scales is not None else 1.0)
    scale = w.scale.expand(channels) if scales is None else w.scale
    oracle = torch.fake_quantize_per_channel_affine(
        adaptive, scale, torch.zeros(channels, dtype=torch.int32), 0, -127, 127
    )
    # Same grid and rounding; a tie can round either way after the channel multiply.
    assert torch.allclose(w.dequantize(), oracle, rtol=0, atol=float(scale.max()) * 1.0001)
    assert (w.dequantize() == oracle).float().mean() > 0.99
    assert w.codes.dtype == torch.int8 and int(w.codes.abs().max()) <= 127
    # Never more than half an int8 step from the adaptive weight, channel by channel.
    err = (w.dequantize() - adaptive).abs().flatten(1).amax(1)
    assert torch.all(err <= 0.5 * scale * (1 + 1e-5) + 1e-7)
    assert w.max_level_error <= 0.5 + 1e-6


def test_levels_already_on_the_int8_grid_map_exactly():
    table = torch.tensor([-127.0, -40.0, 3.0, 90.0]) / 127 * 0.7
    idx = torch.tensor([[0, 1, 2, 3], [3, 3, 0, 1]])
    w = adaptive_to_int8(table, idx, torch.tensor([1.0, 0.25]))
    assert w.level_codes.tolist() == [-127, -40, 3, 90]
    assert w.relative_rmse < 1e-6


def test_relative_error_is_the_weights_error_not_the_levels():
    # A level no weight uses must not count.
    table = torch.tensor([-1.0, 0.0, 64 / 127, 1.0 / 3])
    idx_unused = torch.tensor([[0, 1, 2]])
    idx_used = torch.tensor([[3, 3, 3]])
    assert adaptive_to_int8(table, idx_unused).relative_rmse < 1e-7
    assert adaptive_to_int8(table, idx_used).relative_rmse > 1e-4


@pytest.mark.parametrize(
    "table, idx, scales, message",
    [
        (torch.zeros(1), torch.zeros(2, dtype=torch.long), None, "1-D table of at least 2"),
        (torch.zeros(4), torch.tensor([0, 4]), None, "out of range"),
        (torch.ones(4), torch.zeros(3, 2, dtype=torch.long), torch.ones(2), "3 output channels"),
    ],
)
def test_bad_input_is_named(table, idx, scales, message):
    with pytest.raises(ValueError, match=message):
        adaptive_to_int8(table, idx, scales)


def test_all_zero_table():
    w = adaptive_to_int8(torch.zeros(4), torch.zeros(2, 3, dtype=torch.long))
    assert w.relative_rmse == 0.0 and int(w.codes.abs().max()) == 0
