"""ddq.prepare / DDQConfig / ddq.summary on torchvision models and user modules."""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ddq
from ddq.layers import QuantLayer

EXAMPLE = torch.zeros(1, 3, 64, 64)


def _float_layers(model):
    return {n: m for n, m in model.named_modules() if type(m) in (nn.Conv1d, nn.Conv2d, nn.Linear)}


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_convert_train_and_count(arch):
    model = getattr(torchvision.models, arch)(num_classes=10)
    reference = copy.deepcopy(model).eval()
    float_layers = _float_layers(model)
    with FlopCounterMode(display=False) as counter:
        reference(EXAMPLE)
    oracle_macs = counter.get_total_flops() // 2

    ddq.prepare(model, example_inputs=EXAMPLE)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], QuantLayer) for n in float_layers)
    state = model.ddq_state
    assert state.float_layers == []
    for role in (state.first, state.last):
        layer = modules[role]
        assert layer.weight_quantizer.bits == 8 and int(layer.weight_quantizer.ceiling) == 8
        assert int(layer.weight_quantizer.floor) == 8
    assert isinstance(modules[state.last], nn.Linear)

    x = torch.randn(2, 3, 64, 64)
    assert ddq.calibrate(model, [x]) == len(float_layers)
    model.train()
    model(x).logsumexp(1).sum().backward()
    assert all(m.weight.grad is not None for m in float_layers.values())
    gate_grads = [modules[n].weight_quantizer.gate_logits.grad for n in float_layers]
    assert any(g is not None and g.abs().sum() > 0 for g in gate_grads)

    rows = ddq.summary(model)
    assert [r["name"] for r in rows] == list(float_layers)
    assert sum(r["params"] for r in rows) == sum(
        p.numel() for m in float_layers.values() for p in m.parameters()
    )
    assert sum(r["macs"] for r in rows) == oracle_macs
    assert "total:" in str(rows)


def test_quantization_disabled_equals_float_layer_exactly():
    net = nn.Sequential(
        nn.Conv1d(3, 6, 3),
        nn.ReLU(),
        nn.Conv1d(6, 6, 3, groups=6),
        nn.Flatten(),
        nn.Linear(6 * 12, 4),
    )
    ref = copy.deepcopy(net)
    ddq.prepare(net, ddq.DDQConfig(first_last_bits="learn"))
    x = torch.randn(5, 3, 16)
    for m in net.modules():
        if isinstance(m, QuantLayer):
            m.quantize = False
    assert torch.equal(net(x), ref(x))


def test_depthwise_and_grouped_conv2d_quantize_and_eval_freezes_state():
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, groups=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 3),
    )
    ddq.prepare(net, ddq.DDQConfig(first_last_bits="learn"), example_inputs=torch.zeros(1, 4, 8, 8))
    rows = {r["name"]: r for r in ddq.summary(net)}
    assert rows["2"]["kind"] == "depthwise" and rows["0"]["kind"] == "conv"
    x = torch.randn(3, 4, 8, 8)
    ddq.calibrate(net, [x])
    net.eval()
    before = copy.deepcopy(net.state_dict())
    y1, y2 = net(x), net(x)
    assert torch.equal(y1, y2)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the quantized output differs from float, and only slightly at 8 bits
    for m in net.modules():
        if isinstance(m, QuantLayer):
            m.quantize = False
    assert not torch.equal(y1, net(x))
    assert (y1 - net(x)).abs().max() < 0.05 * net(x).abs().max()


def test_overrides_by_type_and_name_and_skip():
    model = torchvision.models.mobilenet_v2(num_classes=10)
    cfg = ddq.DDQConfig(
        weight=ddq.QuantizerConfig(mode="uniform"),
        by_type={"depthwise": {"weight": {"min_bits": 4}}},
        by_name={"features.2.conv.2": {"activation": None, "weight": {"bits": 3}}},
        skip=["features.1.*"],
    )
    ddq.prepare(model, cfg, example_inputs=EXAMPLE)
    mods = dict(model.named_modules())
    assert mods["features.2.conv.1.0"].weight_quantizer.min_bits == 4
    assert mods["features.2.conv.2"].input_quantizer is None
    assert mods["features.2.conv.2"].weight_quantizer.bits == 3
    assert mods["features.2.conv.0.0"].weight_quantizer.mode == "uniform"
    assert not isinstance(mods["features.1.conv.0.0"], QuantLayer)
    assert ("features.1.conv.1", "Conv2d", "skipped by config") in model.ddq_state.float_layers
    assert ddq.DDQConfig.from_dict(cfg.to_dict()) == cfg


def test_first_last_float_convention_and_unsupported_layers_are_listed():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ConvTranspose2d(4, 4, 3),
        nn.Conv2d(4, 4, 1),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 2),
    )
    ddq.prepare(net, ddq.DDQConfig(first_last_bits="float"), example_inputs=torch.zeros(1, 3, 8, 8))
    listed = {name: why for name, _, why in net.ddq_state.float_layers}
    assert listed == {
        "0": "first/last convention",
        "1": "layer type not supported by ddq",
        "4": "first/last convention",
    }
    assert isinstance(net[2], QuantLayer)
    rows = {r["name"]: r for r in ddq.summary(net)}
    assert rows["1"]["w_bits"] == 32 and rows["1"]["mode"] == "float"


@pytest.mark.parametrize(
    "cfg, match",
    [
        (lambda: ddq.DDQConfig(weight=ddq.QuantizerConfig(max_bits=0)), "max_bits"),
        (lambda: ddq.DDQConfig(weight=ddq.QuantizerConfig(max_bits=9)), "max_bits"),
        (lambda: ddq.DDQConfig(activation=ddq.QuantizerConfig(max_bits=4, min_bits=6)), "min_bits"),
        (lambda: ddq.DDQConfig(weight=ddq.QuantizerConfig(mode="pow2")), "mode"),
        (
            lambda: ddq.DDQConfig(by_name={"nothing.here": {"weight": {"bits": 4}}}),
            "matches no module",
        ),
        (lambda: ddq.DDQConfig(skip=["nope*"]), "matches no module"),
        (lambda: ddq.DDQConfig(by_type={"conv2d": {"weight": {}}}), "matches no module type"),
        (lambda: ddq.DDQConfig(by_type={"Conv2d": {"weight": {"colour": 1}}}), "unknown quantizer"),
        (lambda: ddq.DDQConfig(first_last_bits=12), "first_last_bits"),
    ],
)
def test_invalid_config_raises_value_error_saying_why(cfg, match):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(ValueError, match=match):
        ddq.prepare(net, cfg(), example_inputs=torch.zeros(1, 3, 8, 8))


def test_nan_in_training_names_the_layer():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    ddq.prepare(net)
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"'0\.input'"):
        net.train()(x)


def test_calibration_uses_batch_statistics_and_restores_batchnorm():
    model = torchvision.models.mobilenet_v2(num_classes=10)
    ddq.prepare(model, example_inputs=EXAMPLE)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x = torch.randn(4, 3, 64, 64) * 3
    ddq.calibrate(model, [x], reestimate_bn=False)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not model.training  # mode restored
    # ranges fit what the layers see in training (batch statistics), so little is clipped
    model.train()
    clipped = []
    for m in model.modules():
        if isinstance(m, QuantLayer) and m.input_quantizer is not None:
            m.register_forward_pre_hook(
                lambda mod, inp: clipped.append(
                    float((inp[0] > mod.input_quantizer.levels()[-1] * 1.5).float().mean())
                )
            )
    model(x)
    assert max(clipped) < 0.01


def test_calibration_reestimates_batchnorm_with_the_quantized_model():
    """By default the running statistics become those of the *quantized* model on the
    calibration data: checked against the statistics of the quantized conv's output,
    computed directly (cumulative average over the two batches)."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.LazyLinear(4))  # fmt: skip
    net(EXAMPLE)
    cfg = ddq.DDQConfig(weight=ddq.QuantizerConfig(bits=3, per_channel=True),
                        activation=ddq.QuantizerConfig(bits=3, signed=None),
                        first_last_bits="learn")  # fmt: skip
    ddq.prepare(net, cfg, example_inputs=EXAMPLE)
    xs = [torch.randn(4, 3, 64, 64) * 3, torch.randn(4, 3, 64, 64)]
    ddq.calibrate(net, xs)
    conv, bn = net[0], net[1]
    with torch.no_grad():
        conv.eval()
        outs = [conv(x) for x in xs]  # the quantized conv, as calibration left it
    dims = (0, 2, 3)
    mean = torch.stack([o.mean(dims) for o in outs]).mean(0)
    var = torch.stack([o.var(dims, unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-6)
    assert int(bn.num_batches_tracked) == 2 and bn.momentum == 0.1  # momentum restored
