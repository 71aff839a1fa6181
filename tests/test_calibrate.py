"""Calibration fits every quantizer to real data and refuses to be poisoned."""

import pytest
import torch
from torch import nn

import ddq
from ddq.layers import QuantLayer
from ddq.quantizer.fitting import best_uniform_step


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    )  # fmt: skip
    cfg = ddq.DDQConfig(
        weight=ddq.QuantizerConfig(mode="uniform", bits=4, per_channel=True),
        activation=ddq.QuantizerConfig(mode="uniform", bits=4, signed=None),
        first_last_bits="learn",
    )
    return ddq.prepare(net, cfg, example_inputs=torch.zeros(1, 1, 8, 8))


def _batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 1, 8, 8, generator=g) for _ in range(n)]


def test_nan_in_calibration_data_names_the_layer_it_entered():
    net = _net()
    batches = _batches()
    batches[1][3, 0, 2, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"'0\.input'.*NaN or Inf"):
        ddq.calibrate(net, batches)


def test_nan_born_inside_the_network_names_the_first_layer_that_sees_it():
    net = _net()
    with torch.no_grad():
        net[2].bias[5] = float("inf")  # conv "2" outputs Inf: layer "5" is the first to see it
    with pytest.raises(FloatingPointError, match=r"'5\.input'"):
        ddq.calibrate(net, _batches())


def test_a_stray_forward_before_calibration_leaves_no_collapsed_range():
    """A quick "does it run" call on zeros in training mode initialises the input ranges
    from zeros; calibration must re-fit them from real data, not skip them."""
    reference = _net()
    ddq.calibrate(reference, _batches())
    net = _net()
    net.train()
    net(torch.zeros(2, 1, 8, 8))  # initialises every input quantizer from zeros
    assert float(net[0].input_quantizer.levels().abs().max()) < 1e-3
    ddq.calibrate(net, _batches())
    for a, b in zip(reference.modules(), net.modules(), strict=True):
        if isinstance(a, QuantLayer):
            torch.testing.assert_close(a.input_quantizer.levels(), b.input_quantizer.levels())
    # ... unless the caller asks to keep them
    net(torch.zeros(2, 1, 8, 8))
    kept = _net()
    kept.train()
    kept(torch.zeros(2, 1, 8, 8))
    ddq.calibrate(kept, _batches(), keep_ranges=True)
    assert float(kept[0].input_quantizer.levels().abs().max()) < 1e-3


def test_calibration_refits_weights_to_their_current_values():
    net = _net()
    with torch.no_grad():
        net[0].weight.mul_(10)  # e.g. trained after prepare
    ddq.calibrate(net, _batches())
    wq = net[0].weight_quantizer
    expected = best_uniform_step(net[0].weight, 4, True, channel_axis=0)
    torch.testing.assert_close(wq.uniform_params()[0] * wq.channel_scales(), expected)


def test_mse_calibration_fits_activations_better_than_percentiles():
    errs = {}
    for method in ("mse", "percentile"):
        net = _net()
        ddq.calibrate(net, _batches(), method=method)
        q = net[2].input_quantizer
        x = torch.relu(net[0](_batches(1)[0]))
        q.eval()
        errs[method] = float((q(x).detach() - x).square().mean())
    assert errs["mse"] < errs["percentile"]
    with pytest.raises(ValueError, match="method"):
        ddq.calibrate(_net(), _batches(), method="minmax")


def test_keyword_inputs_calibrate():
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, *, features: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.fc(features)))

    net = ddq.prepare(Keyword(), ddq.DDQConfig(first_last_bits="learn"))
    batches = [{"features": torch.randn(8, 4)} for _ in range(2)]
    assert ddq.calibrate(net, batches) == 2
    assert bool(net.head.input_quantizer.initialized)
