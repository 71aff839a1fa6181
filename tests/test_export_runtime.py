"""The deploy runtime's two kernels against the fake-quantized model.

``kernel="float"`` decodes the weights once; ``kernel="reference"`` runs the low-precision
products of the method's deployment (integer GEMM on the codes when weight and input are
both uniform, table-lookup accumulation otherwise, then the per-channel weight scale).
Both must give the fake-quantized model's outputs, with per-channel and per-tensor weights.
"""

from __future__ import annotations

import pytest
import torch
from export_helpers import (
    TOL,
    build_model,
    quantized_layers,
    rel_diff,
)
from torch import nn

import ddq
from ddq.deploy import export, load, set_kernel
from ddq.deploy import runtime as runtime_module
from ddq.deploy.runtime import PackedConv1d, PackedConv2d, PackedLinear

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count the calls of each reference kernel the runtime makes."""
    calls: dict[str, int] = {}
    for name in ("int_conv2d", "int_linear", "lut_conv2d", "lut_linear"):
        fn = getattr(runtime_module, name)

        def spy(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(runtime_module, name, spy)
    return calls


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("mode", ["uniform", "adaptive", "mixed"])
def test_reference_kernels_reproduce_the_fake_quant_model(
    tmp_path, mode, per_channel, kernel_calls
):
    net, x = build_model(mode, per_channel=per_channel)
    export(net, tmp_path / "m.safetensors")
    with torch.no_grad():
        want = net(x)
        fast = load(tmp_path / "m.safetensors", model=net)
        ref = load(tmp_path / "m.safetensors", model=net, kernel="reference")
        assert torch.equal(fast(x), want)
        assert rel_diff(ref(x), want) <= TOL
    # 5 layers: 4 convs (Conv1d lowered to conv2d) and one Linear, each through a kernel.
    if mode == "uniform":
        assert kernel_calls == {"int_conv2d": 4, "int_linear": 1}
    elif mode == "adaptive":
        assert kernel_calls == {"lut_conv2d": 4, "lut_linear": 1}
    else:  # only dw has uniform weight and input: the integer path
        assert kernel_calls == {"int_conv2d": 1, "lut_conv2d": 3, "lut_linear": 1}


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("kernel", ["float", "reference"])
def test_each_layer_matches_its_fake_quant_layer(tmp_path, kernel, per_channel):
    """Layer by layer on the same input, so a flip upstream cannot hide an error here."""
    net, x = build_model("mixed", per_channel=per_channel)
    export(net, tmp_path / "m.safetensors")
    runtime = load(tmp_path / "m.safetensors", model=net, kernel=kernel)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, n=n: inputs.__setitem__(n, a[0]))
        for n, m in quantized_layers(net)
    ]
    with torch.no_grad():
        net(x)
        for h in hooks:
            h.remove()
        for name, layer in quantized_layers(net):
            want = layer(inputs[name])
            got = runtime.get_submodule(name)(inputs[name])
            assert rel_diff(got, want) <= 1e-6, name
            if kernel == "float":
                assert torch.equal(got, want), name


class Paddings(nn.Module):
    """Convs whose padding is not plain symmetric zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.reflect = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.same = nn.Conv2d(4, 4, (2, 3), padding="same", bias=False)  # asymmetric
        self.circular = nn.Conv1d(4, 3, 3, padding=2, dilation=2, padding_mode="circular")
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.same(torch.relu(self.reflect(x))))
        x = torch.relu(self.circular(x.flatten(2)))
        return self.fc(x.mean(-1))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("mode", ["uniform", "adaptive"])
def test_padding_modes_in_both_kernels(tmp_path, mode, per_channel):
    torch.manual_seed(0)
    x = torch.randn(3, 2, 6, 5)
    cfg = ddq.DDQConfig(
        weight=ddq.QuantizerConfig(mode=mode, bits=4, per_channel=per_channel),
        activation=ddq.QuantizerConfig(mode=mode, bits=5, signed=None),
        first_last_bits="learn",
    )
    net = ddq.prepare(Paddings(), cfg, example_inputs=x[:1])
    ddq.calibrate(net, [torch.randn(8, 2, 6, 5)])
    net.eval()
    export(net, tmp_path / "p.safetensors")
    with torch.no_grad():
        want = net(x)
        for kernel in ("float", "reference"):
            got = load(tmp_path / "p.safetensors", model=net, kernel=kernel)(x)
            assert rel_diff(got, want) <= TOL, kernel


@pytest.mark.parametrize("per_channel", [True, False])
def test_runtime_state_is_the_packed_artifact(tmp_path, per_channel):
    net, _ = build_model("uniform", per_channel=per_channel)
    export(net, tmp_path / "m.safetensors")
    runtime = load(tmp_path / "m.safetensors", model=net)
    layers = [
        m for m in runtime.modules() if isinstance(m, PackedConv1d | PackedConv2d | PackedLinear)
    ]
    assert len(layers) == 5
    state = runtime.state_dict()
    # Persistent state: packed codes (uint8) and small float tables, no float weights.
    assert not [k for k in state if k.endswith(".weight")]
    assert state["pw.weight_idx"].dtype == torch.uint8
    assert state["pw.weight_idx"].numel() == 16 * 8 * 2 // 8  # 2-bit pointwise conv
    assert runtime.pw.weight.shape == (16, 8, 1, 1)  # decoded copy for the float kernel
    if per_channel:  # one float32 scale per output channel, nothing more
        assert state["pw.weight_scale"].shape == (16,)
        assert torch.equal(state["pw.weight_scale"], net.pw.weight_quantizer.channel_scales())
        assert "per-channel" in repr(runtime.pw)
    else:
        assert "pw.weight_scale" not in state


def test_set_kernel_switches_and_validates(tmp_path):
    net, x = build_model("adaptive")
    export(net, tmp_path / "m.safetensors")
    runtime = load(tmp_path / "m.safetensors", model=net)
    with torch.no_grad():
        fast = runtime(x)
        set_kernel(runtime, "reference")
        assert runtime.fc.kernel == "reference"
        assert rel_diff(runtime(x), fast) <= TOL
    with pytest.raises(ValueError, match="unknown kernel 'int4'"):
        set_kernel(runtime, "int4")
    with pytest.raises(ValueError, match="unknown kernel"):
        load(tmp_path / "m.safetensors", model=net, kernel="fast")
