"""``ddq.export`` / ``ddq.load``: packed artifact contents, sizes, and exact reproduction.

The oracle is the fake-quantized PyTorch model (``ddq.prepare`` + calibration, eval mode):
the loaded runtime must give its outputs (max abs difference <= 1e-5 of max |output|; the
float kernel in fact bit for bit). Weights are per-channel (the default) or per-tensor.
Shared models and helpers: ``export_helpers.py``.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from export_helpers import (
    A_BITS,
    TOL,
    TinyNet,
    build_model,
    quantized_layers,
    quantized_weight_parts,
    randomize_batchnorm,
    rel_diff,
    settle_batchnorm,
)
from torch import nn

import ddq
from ddq.deploy import export, load, read_artifact
from ddq.deploy.artifact import activation_thresholds, batchnorm_affine
from ddq.deploy.manifest import BATCHNORM_KEY, FORMAT_VERSION, TABLES_KEY, QuantSpec, index_key
from ddq.deploy.packing import unpack_bits
from ddq.deploy.runtime import (
    ChannelAffine,
    FrozenActivationQuantizer,
    PackedConv1d,
    PackedConv2d,
    PackedLinear,
)
from ddq.layers import QuantLayer
from ddq.quantizer import DDQQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("mode", ["uniform", "adaptive", "mixed"])
def test_load_reproduces_fake_quant_model(tmp_path, mode, per_channel):
    net, x = build_model(mode, per_channel=per_channel)
    assert (net.dw.weight_quantizer.channel_scales() is not None) == per_channel
    with torch.no_grad():
        want = net(x)
    info = export(net, tmp_path / "tiny.ddq.safetensors")
    runtime = load(info.path, model=net)
    with torch.no_grad():
        got = runtime(x)
    assert rel_diff(got, want) <= TOL
    assert torch.equal(got, want)  # decoded weights are the fake-quantized ones exactly
    # No training-time module survives; every layer kind has its deploy module.
    kinds = {type(m) for m in runtime.modules()}
    assert not kinds & {DDQQuantizer, nn.BatchNorm1d, nn.BatchNorm2d}
    assert not any(isinstance(m, QuantLayer) for m in runtime.modules())
    assert {PackedConv1d, PackedConv2d, PackedLinear, ChannelAffine} <= kinds
    assert isinstance(runtime.dw.input_quantizer, FrozenActivationQuantizer)
    # The model passed in is copied, not modified.
    assert isinstance(net.dw, QuantLayer)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("mode", ["uniform", "adaptive"])
def test_weights_are_packed_at_b_bits_and_decode_to_the_quantized_weights(
    tmp_path, mode, per_channel
):
    net, _ = build_model(mode, per_channel=per_channel)
    export(net, tmp_path / "a.safetensors")
    manifest, tensors = read_artifact(tmp_path / "a.safetensors")
    for name, layer in quantized_layers(net):
        spec = manifest.layers[name]
        bits = layer.weight_quantizer.bits
        n = layer.weight.numel()
        packed = tensors[index_key(name)]
        assert spec.weight.bits == bits and spec.weight.per_channel == per_channel
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
        parts = spec.split_tables(tensors[TABLES_KEY])
        table = parts["weight_table"]
        assert table.numel() == 2**bits
        want, levels, scales = quantized_weight_parts(layer)
        assert torch.equal(table, levels)
        codes = unpack_bits(packed, bits, n).long().view(layer.weight.shape)
        assert torch.equal(codes, layer.weight_quantizer.indices(layer.weight))
        if per_channel:
            # One float32 scale per output channel; element = table[idx] * scale[c], exactly.
            got_scales = parts["channel_scales"]
            assert got_scales.dtype == torch.float32 and torch.equal(got_scales, scales)
            view = (-1,) + (1,) * (layer.weight.dim() - 1)
            assert torch.equal(table[codes] * got_scales.view(view), want)
        else:
            assert "channel_scales" not in parts and scales is None
            assert torch.equal(table[codes], want)


@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_indices_are_checked_and_fall_back_to_an_exact_search(
    tmp_path, monkeypatch, per_channel
):
    net, x = build_model("adaptive", per_channel=per_channel)
    q = net.pw.weight_quantizer
    # Indices that do not decode to the quantized weights: export looks the exact values
    # up among the exact levels (times their channel scale) instead.
    monkeypatch.setattr(q, "indices", lambda w: torch.zeros_like(w, dtype=torch.long))
    export(net, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "a.safetensors", model=net)(x), net(x))
    # Weights that are not on the levels at all are refused.
    monkeypatch.setattr(q, "forward", lambda w: w)
    with pytest.raises(RuntimeError, match=r"layer 'pw': quantized weights are not all table"):
        export(net, tmp_path / "b.safetensors")


def test_per_channel_uniform_weights_are_an_exact_integer_grid_per_channel(tmp_path):
    """Channel c's weights are ``(scale * channel_scales[c]) * (j - zero_point)`` exactly:
    per-channel affine integer quantization on axis 0 with one shared zero point."""
    net, _ = build_model("uniform", per_channel=True)
    export(net, tmp_path / "u.safetensors")
    manifest, tensors = read_artifact(tmp_path / "u.safetensors")
    for name, layer in quantized_layers(net):
        w = manifest.layers[name].weight
        step, zero = layer.weight_quantizer.uniform_params()
        assert (w.scale, w.zero_point) == (step, zero)
        assert math.frexp(w.scale)[0] == 0.5  # a power of two
        parts = manifest.layers[name].split_tables(tensors[TABLES_KEY])
        integer_step = parts["channel_scales"] * w.scale  # exact: times a power of two
        codes = unpack_bits(tensors[index_key(name)], w.bits, layer.weight.numel()).long()
        codes = codes.view(layer.weight.shape)
        view = (-1,) + (1,) * (layer.weight.dim() - 1)
        grid = (codes - zero).float() * integer_step.view(view)
        want, _, _ = quantized_weight_parts(layer)
        assert torch.equal(grid, want), name


def test_manifest_records_layers_conventions_and_checksums(tmp_path):
    net, _ = build_model("mixed")
    arch = {"name": "tiny", "kwargs": {"in_channels": 3}}
    export(net, tmp_path / "m.safetensors", arch=arch)
    manifest, tensors = read_artifact(tmp_path / "m.safetensors")
    assert manifest.format_version == FORMAT_VERSION == 3
    assert manifest.architecture == arch
    assert manifest.conventions == net.ddq_state.conventions()
    assert list(manifest.layers) == [n for n, _ in quantized_layers(net)]
    dw, fc, c1 = manifest.layers["dw"], manifest.layers["fc"], manifest.layers["c1"]
    assert (dw.type, dw.weight_shape, dw.conv["groups"], dw.conv["stride"]) == (
        "Conv2d", (8, 1, 3, 3), 8, [2, 2],
    )  # fmt: skip
    assert (c1.type, fc.type, fc.bias, dw.bias) == ("Conv1d", "Linear", True, False)
    assert (dw.weight.mode, dw.input.mode, fc.weight.mode, fc.input.mode) == (
        "uniform", "uniform", "adaptive", "uniform",
    )  # fmt: skip
    scale, zero = net.dw.weight_quantizer.uniform_params()
    assert dw.weight.scale == pytest.approx(scale, rel=1e-7) and dw.weight.zero_point == zero
    # Weights per channel (the default); activations never.
    assert all(s.weight.per_channel for s in manifest.layers.values())
    assert not any(s.input.per_channel for s in manifest.layers.values())
    assert manifest.conventions["weights_per_channel"] is True
    assert [s.input.bits for s in manifest.layers.values()] == list(A_BITS)
    assert set(manifest.batchnorm) == {"bn", "bn2", "bn1"}
    assert set(manifest.checksums) == {"ddq.indices", "ddq.tables", "ddq.batchnorm"}
    assert {k for k in tensors if k.endswith(".weight.idx")} == {
        f"{n}.weight.idx" for n in manifest.layers
    }
    assert manifest.float_tensors == []  # everything is a ddq layer or a BatchNorm


@pytest.mark.parametrize("mode", ["uniform", "adaptive"])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_thresholds_reproduce_the_quantizer_exactly(mode, bits):
    q = DDQQuantizer(max_bits=8, min_bits=1, mode=mode, signed=None)
    q.init_range(-0.7, 2.3)
    q.set_bits(bits)
    if mode == "adaptive":  # genuinely non-uniform levels
        with torch.no_grad():
            q.raw_gaps.add_(torch.randn_like(q.raw_gaps))
    q.eval()
    thresholds, table = activation_thresholds(q)
    assert thresholds.numel() == 2**bits - 1 and torch.equal(table, q.levels())
    # Dense values plus every threshold and its float32 neighbours: the worst cases.
    inf = torch.tensor(float("inf"))
    x = torch.cat([
        torch.linspace(-3, 5, 20001), thresholds,
        torch.nextafter(thresholds, inf), torch.nextafter(thresholds, -inf),
    ])  # fmt: skip
    frozen = FrozenActivationQuantizer(QuantSpec(mode, bits, True), thresholds, table)
    with torch.no_grad():
        assert torch.equal(frozen(x), q(x))


def test_batchnorm_becomes_an_exact_per_channel_affine():
    bn = nn.BatchNorm2d(5)
    randomize_batchnorm(bn)
    bn.eval()
    scale, bias = batchnorm_affine(bn)
    expected = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(scale, expected, rtol=1e-6)
    assert torch.allclose(bias, bn.bias - bn.running_mean * expected, rtol=1e-5, atol=1e-7)
    x = torch.randn(4, 5, 7, 7)
    with torch.no_grad():
        assert torch.equal(ChannelAffine(scale, bias)(x), bn(x))


def _mnist(n: int) -> torch.Tensor:
    from ddq.data import create_dataset

    splits = create_dataset("mnist5k", subset=n)
    return torch.stack([splits.test[i][0] for i in range(n)])


def _independent_theoretical_bytes(model: nn.Module) -> float:
    """sum(n b / 8) + tables (+ channel scales) + float parts, from the prepared model."""
    total = 0.0
    for _, layer in quantized_layers(model):
        bw = layer.weight_quantizer.bits
        total += layer.weight.numel() * bw / 8 + 4 * 2**bw
        if layer.weight_quantizer.per_channel:
            total += 4 * layer.weight.shape[0]  # one float32 scale per output channel
        if layer.input_quantizer is not None:
            total += 4 * (2 * 2**layer.input_quantizer.bits - 1)
        if layer.bias is not None:
            total += 4 * layer.bias.numel()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            total += 8 * m.num_features  # scale and bias
    return total


# Per-channel adaptive is covered on TinyNet: its data-driven start (Lloyd's table
# alternated with a scale search per channel) takes minutes on a registry model here.
@pytest.mark.parametrize(
    ("name", "mode", "per_channel"),
    [("resnet18", "adaptive", False), ("mobilenet_v2", "uniform", True)],
)
def test_registry_models_are_small_and_reload_from_the_manifest(tmp_path, name, mode, per_channel):
    from ddq.models import create_model

    kwargs = {"num_classes": 10, "in_channels": 1, "small_input": True}
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    images = _mnist(8)
    cfg = ddq.DDQConfig(
        weight=ddq.QuantizerConfig(mode=mode, per_channel=per_channel),
        activation=ddq.QuantizerConfig(mode=mode, signed=None),
    )
    settle_batchnorm(model, images)
    ddq.prepare(model, cfg, example_inputs=images[:1])
    state = model.ddq_state
    for lname, layer in quantized_layers(model):
        if lname not in (state.first, state.last):  # 8-bit first/last convention
            layer.weight_quantizer.set_bits(4)
            layer.input_quantizer.set_bits(4)
    ddq.calibrate(model, [images])
    model.eval()
    with torch.no_grad():
        want = model(images)

    info = export(model, tmp_path / f"{name}.safetensors", arch={"name": name, "kwargs": kwargs})
    assert info.artifact_bytes == (tmp_path / f"{name}.safetensors").stat().st_size
    theory = _independent_theoretical_bytes(model)
    assert info.theoretical_bytes == pytest.approx(theory)
    assert theory <= info.artifact_bytes <= 1.05 * theory
    fp32 = 4 * sum(t.numel() for k, t in model.state_dict().items()
                   if t.is_floating_point() and "quantizer" not in k)  # fmt: skip
    assert info.fp32_bytes == fp32 and info.ratio > 6.5
    assert 4.0 <= info.avg_weight_bits < 4.1

    runtime = load(info.path)  # architecture from the registry name in the manifest
    with torch.no_grad():
        got = runtime(images)
    assert rel_diff(got, want) <= TOL
    assert torch.equal(got, want)
    assert not any(isinstance(m, DDQQuantizer) for m in runtime.modules())


# What the file may add to the theoretical size of a small model: 5% plus this many bytes
# (the safetensors header and the manifest: 1.2-1.4 KB on the models below).
SMALL_MODEL_SLACK = 1024


@pytest.mark.parametrize("mode", ["uniform", "adaptive", "tiny"])
def test_small_models_stay_within_5_percent_of_their_theoretical_size(tmp_path, mode):
    from ddq.models import create_model

    if mode == "tiny":
        model, _ = build_model("mixed")  # about 1.1k weights, 5 layers
    else:  # about 31k weights, 5 layers, 4 bits in the middle, 8 at the ends
        torch.manual_seed(0)
        kwargs = {"num_classes": 10, "in_channels": 1, "width": 24}
        model = create_model("small_cnn", **kwargs)
        images = torch.randn(16, 1, 28, 28)
        settle_batchnorm(model, images)
        cfg = ddq.DDQConfig(
            weight=ddq.QuantizerConfig(mode=mode),
            activation=ddq.QuantizerConfig(mode=mode, signed=None),
        )
        ddq.prepare(model, cfg, example_inputs=images[:1])
        state = model.ddq_state
        for name, layer in quantized_layers(model):
            if name not in (state.first, state.last):
                layer.weight_quantizer.set_bits(4)
                layer.input_quantizer.set_bits(4)
        ddq.calibrate(model, [images])
        model.ddq_arch = {"name": "small_cnn", "kwargs": kwargs}
    info = export(model, tmp_path / "small.safetensors")
    assert info.artifact_bytes <= 1.05 * info.theoretical_bytes + SMALL_MODEL_SLACK, str(info)
    # The manifest is what made small files big (version 2: about 3 KB here).
    manifest, _ = read_artifact(info.path)
    assert len(manifest.to_json()) < len(manifest.to_json(2)) / 2


def test_load_builds_the_architecture_with_the_factory_passed(tmp_path, monkeypatch):
    import ddq.deploy.loader as loader

    def no_registry(arch):
        raise AssertionError("the registry is needed only when no factory is passed")

    monkeypatch.setattr(loader, "registry_factory", no_registry)
    net, x = build_model("mixed")
    arch = {"name": "tiny", "kwargs": {"in_channels": 3}}
    info = export(net, tmp_path / "f.safetensors", arch=arch)
    seen = []

    def factory(recorded):
        seen.append(recorded)
        return TinyNet(**recorded["kwargs"])

    runtime = ddq.load(info.path, model_factory=factory)
    assert seen == [arch]
    with torch.no_grad():
        assert torch.equal(runtime(x), net(x))
    with pytest.raises(ValueError, match="not both"):
        ddq.load(info.path, model=net, model_factory=factory)
    with pytest.raises(ValueError, match=r"f\.safetensors: model_factory returned a str"):
        ddq.load(info.path, model_factory=lambda recorded: "tiny")

    def broken(recorded):
        raise ValueError("boom")

    with pytest.raises(ValueError, match=r"f\.safetensors: cannot build.*'tiny'.*boom"):
        ddq.load(info.path, model_factory=broken)


def test_export_refuses_unprepared_or_uncalibrated_models(tmp_path):
    with pytest.raises(ValueError, match="not prepared"):
        export(TinyNet(), tmp_path / "x.safetensors")
    net = ddq.prepare(TinyNet(), example_inputs=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"'conv'.*input quantizer.*calibrate"):
        export(net, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="arch"):
        export(build_model("uniform")[0], tmp_path / "x.safetensors", arch={"kwargs": {}})
    assert not (tmp_path / "x.safetensors").exists()


def test_batchnorm_tensor_holds_scale_and_bias_rows(tmp_path):
    net, _ = build_model("uniform")
    export(net, tmp_path / "a.safetensors")
    manifest, tensors = read_artifact(tmp_path / "a.safetensors")
    affine = tensors[BATCHNORM_KEY]
    assert affine.shape == (2, 8 + 8 + 12)
    scale, bias = manifest.batchnorm["bn2"].split(affine)
    want_scale, want_bias = batchnorm_affine(net.bn2)
    assert torch.equal(scale, want_scale) and torch.equal(bias, want_bias)


def test_cli_export_writes_a_checked_artifact_and_onnx(tmp_path, monkeypatch, capsys):
    import argparse

    onnx = pytest.importorskip("onnx")
    from ddq.cli import export_cmd
    from ddq.jobs import run as pipeline

    net, x = build_model("mixed")
    monkeypatch.setattr(pipeline, "load_run", lambda run_dir: (net, x))
    # The run's test images: labelled with the model's own predictions, so its reported
    # PyTorch accuracy must be exactly 100%.
    with torch.no_grad():
        labels = net(x).argmax(1)
    monkeypatch.setattr(export_cmd, "_test_images", lambda run_dir, n, root: (x[:n], labels[:n]))
    parser = argparse.ArgumentParser()
    export_cmd.add_parser(parser.add_subparsers(dest="command"))
    out, onnx_path = tmp_path / "run.ddq.safetensors", tmp_path / "run.onnx"
    args = parser.parse_args(["export", str(tmp_path), "--out", str(out), "--onnx", str(onnx_path)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "FP32" in printed and "reproduces the model" in printed
    assert out.is_file() and onnx_path.is_file()
    with torch.no_grad():
        assert rel_diff(load(out, model=net)(x), net(x)) <= TOL
    # The batch dimension is symbolic, so ONNX Runtime takes any batch size.
    graph_input = onnx.load(str(onnx_path)).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param
    if importlib.util.find_spec("onnxruntime") is not None:
        assert f"ONNX Runtime on {len(x)} test images" in printed
        assert "accuracy 100.00% (PyTorch)" in printed


def test_deploy_files_import_no_private_names():
    """One concern per file in ddq.deploy, sharing only public names."""
    import ast
    from pathlib import Path

    import ddq.deploy

    found = []
    for path in sorted(Path(ddq.deploy.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_")]
                found += [f"{path.name}: {node.module}.{n}" for n in private if n != "__version__"]
    assert not found, found
