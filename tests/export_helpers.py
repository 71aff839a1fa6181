"""Models and helpers shared by the ``test_export_*`` files.

``build_model`` gives a prepared, calibrated ``TinyNet`` with mixed bits: the oracle for
the exported artifact, the runtime and ONNX is its fake-quantized output. Weights are
per-channel by default (as in ``ddq.DDQConfig``); ``per_channel=False`` gives per-tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import ddq
from ddq.layers import QuantLayer

TOL = 1e-5  # of the output scale, the bar for the loaded runtime


class TinyNet(nn.Module):
    """Every layer kind the artifact handles: conv (+bias), depthwise conv, pointwise conv,
    Conv1d, Linear, BatchNorm1d/2d, ReLU."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1, bias=False)
        self.c1 = nn.Conv1d(16, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.bn2(self.dw(x)))
        x = F.relu(self.pw(x)).flatten(2)
        x = F.relu(self.bn1(self.c1(x))).mean(-1)
        return self.fc(x)


# Mixed bits per layer (conv, dw, pw, c1, fc): weights and input activations.
W_BITS = (8, 3, 2, 5, 6)
A_BITS = (8, 4, 3, 6, 7)


@torch.no_grad()
def settle_batchnorm(model: nn.Module, images: torch.Tensor) -> None:
    """Running statistics equal to the batch statistics of ``images``: an untrained model
    then computes the same in eval mode as in training (where calibration looks)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass sets the batch statistics
    model.train()(images)
    model.eval()


def randomize_batchnorm(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so that a wrong scale or bias shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.3)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


def build_model(
    mode: str, seed: int = 0, per_channel: bool = True
) -> tuple[nn.Module, torch.Tensor]:
    """A prepared, calibrated TinyNet with mixed bits, and a test batch.

    ``mode``: ``"uniform"``, ``"adaptive"``, or ``"mixed"`` (weights and activations
    alternate between the modes layer by layer). ``per_channel``: per-channel weight
    scales (the default) or one range per weight tensor.
    """
    torch.manual_seed(seed)
    net = TinyNet()
    randomize_batchnorm(net)
    x = torch.randn(6, 3, 12, 12)
    cfg = ddq.DDQConfig(
        weight=ddq.QuantizerConfig(
            mode="uniform" if mode == "mixed" else mode, per_channel=per_channel
        ),
        activation=ddq.QuantizerConfig(mode="adaptive" if mode == "mixed" else mode, signed=None),
        first_last_bits="learn",
    )
    if mode == "mixed":  # dw: both uniform (integer path); pw: both adaptive
        cfg.by_name = {
            "dw": {"activation": {"mode": "uniform"}},
            "pw": {"weight": {"mode": "adaptive"}},
            "fc": {"weight": {"mode": "adaptive"}, "activation": {"mode": "uniform"}},
        }
    ddq.prepare(net, cfg, example_inputs=x[:1])
    for (_, layer), wb, ab in zip(quantized_layers(net), W_BITS, A_BITS, strict=True):
        layer.weight_quantizer.set_bits(wb)
        layer.weight_quantizer.init_from(layer.weight)  # range for the new bitwidth
        layer.input_quantizer.set_bits(ab)
    # Keep the randomised BatchNorm statistics (folding must be exercised with arbitrary
    # values); calibration would otherwise re-estimate them from these random images.
    ddq.calibrate(net, [torch.randn(16, 3, 12, 12) for _ in range(2)], reestimate_bn=False)
    return net.eval(), x


def quantized_weight_parts(
    layer: QuantLayer,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(fake-quantized weight, table, channel scales or None)`` of a prepared layer."""
    q = layer.weight_quantizer
    with torch.no_grad():
        values = q(layer.weight)
    return values, q.levels(), q.channel_scales()


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())
