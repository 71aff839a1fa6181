"""``integer_graph``: the eval forward rounds each folded bias as ONNX Runtime's integer
kernels do (``ddq.conversion.bias_rounding``).

Oracles: the correction recomputed here from the module parameters with ONNX Runtime's
rule (``round(b / (s_x s_w[c])) * s_x s_w[c]``, BatchNorm folded), and ONNX Runtime's
fused integer graph itself, which must now agree with PyTorch to float noise.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ddq
from ddq.conversion import preset
from ddq.conversion.bias_rounding import bias_roundings
from ddq.conversion.output_quantizers import output_quantizers
from ddq.deploy import export, export_onnx, load

pytestmark = pytest.mark.usefixtures("one_thread")


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )


def _prepared(name: str, bits: int = 4) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = _net()
    x = torch.randn(64, 3, 8, 8)
    cfg = preset(name, first_last_bits="learn")
    ddq.prepare(net, cfg, example_inputs=x[:1])
    for m in net.modules():
        if isinstance(m, ddq.DDQQuantizer):
            m.set_bits(bits)
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    ddq.calibrate(net, [x], method="percentile", reestimate_bn=False)
    return net.eval(), x


def _oracle(conv: nn.Module, bn: nn.Module | None) -> torch.Tensor:
    """ONNX Runtime's rounding of the export's folded bias, from the parameters."""
    s_x = torch.tensor(conv.input_quantizer.uniform_params()[0], dtype=torch.float32)
    wq = conv.weight_quantizer
    if wq.mode == "uniform":
        step = (wq.channel_scales().double() * wq.uniform_params()[0]).float()
    else:  # int8 form: channel scale times max|level| / 127
        step = (wq.channel_scales() * (float(wq.levels().abs().max()) / 127)).float()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(step.numel())
    if bn is None:
        b, s_w = bias, step
    else:
        c = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        d = (bn.bias - bn.running_mean * c).detach()
        b, s_w = bias * c + d, (step.double() * c.double()).float()
    grid = s_x * s_w
    return torch.round(b / grid) * grid - b


@pytest.mark.parametrize("name", ["uniform", "int8"])
def test_correction_is_ort_rounding_of_the_folded_bias(name):
    net, _ = _prepared(name)
    rounds = bias_roundings(net)
    assert set(rounds) == {"1", "4", "7"}  # after both BatchNorms, and on the Linear
    for target, (layer, bn) in {"1": (0, 1), "4": (3, 4), "7": (7, None)}.items():
        got = rounds[target]()
        want = _oracle(net[layer], None if bn is None else net[bn])
        # BatchNorm's own kernel rounds its scale differently from this oracle: an ulp.
        assert torch.allclose(got, want, atol=1e-6), (target, (got - want).abs().max())
        assert bool((got != 0).any())


def test_training_mode_and_float_graph_models_are_unchanged():
    net, x = _prepared("uniform")
    net.train()
    with torch.no_grad():
        a = net(x)
    for target in bias_roundings(net):
        net.get_submodule(target).__dict__.pop("_ddq_bias_delta")
    with torch.no_grad():
        assert torch.equal(net(x), a)
    torch.manual_seed(0)
    plain = _net()
    ddq.prepare(plain, preset("adaptive"), example_inputs=x[:1])
    assert bias_roundings(plain) == {}


@pytest.mark.parametrize("name", ["uniform", "int8"])
def test_artifact_reproduces_and_ort_integer_graph_agrees(tmp_path, name):
    ort = pytest.importorskip("onnxruntime")
    net, x = _prepared(name)
    with torch.no_grad():
        want = net(x)
    info = export(net, tmp_path / "m.ddq.safetensors")
    runtime = load(info.path, model=_net())
    with torch.no_grad():
        assert torch.equal(runtime(x), want)
    path = export_onnx(net, tmp_path / "m.onnx", x[:1], dynamic_batch=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    step = output_quantizers(net)["7"].uniform_params()[0]
    steps = ((got - want).abs() / step).flatten()
    # Float noise may move a logit that sits on a rounding threshold; measured: none of
    # the 640. Before the rounding was modelled: 46 (uniform) and 4 (int8) moved a step.
    assert int((steps > 0.5).sum()) <= 1, steps.max()


def test_linear_rounds_only_its_2d_output():
    """A Linear on ``(N, T, C)`` exports as ``MatMul`` + float ``Add``: no rounding there."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(32, 8)
    ddq.prepare(net, preset("uniform", first_last_bits="learn"), example_inputs=x[:1])
    ddq.calibrate(net, [x], method="percentile")
    net.eval()
    fn = bias_roundings(net)["2"]
    with torch.no_grad():
        plain = net[2](net[1](net[0](x)))  # a layer called directly: no hook order issue
        assert bool((fn() != 0).any())
        x3 = x.view(4, 8, 8)
        out3 = net(x3)
        net[2].__dict__.pop("_ddq_bias_delta")
        assert torch.equal(net(x3), out3)  # 3-D: unchanged
    assert plain.shape == (32, 4)
