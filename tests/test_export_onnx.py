"""``ddq.export_onnx``: every exported model runs in ONNX Runtime and matches PyTorch.

Oracle: the fake-quantized PyTorch model. Adaptive mode (thresholds + tables, float convs)
must agree to float rounding. Uniform mode goes through ``QuantizeLinear``, whose rounding
(``x / scale``) and ONNX Runtime's integer kernels differ from the fake-quant arithmetic
in the last bit, which can move a value sitting on a rounding boundary by one step; the
bound allows that, and nothing like a wrong scale, zero point or weight layout.

Weights are per-channel (the default: per-channel ``DequantizeLinear`` on axis 0, or
``Gather`` then ``Mul`` by the channel scales) or per-tensor; both are checked.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from export_helpers import (
    A_BITS,
    build_model,
    quantized_layers,
    rel_diff,
)
from torch import nn

import ddq
from ddq.deploy import export, export_onnx, load

pytestmark = pytest.mark.usefixtures("one_thread")

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ADAPTIVE_TOL = 1e-5
UNIFORM_TOL = 2e-2  # a few one-step flips at rounding boundaries, see the module docstring


def run_ort(path, x: torch.Tensor, optimized=None, level=None) -> torch.Tensor:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    if level is not None:
        so.graph_optimization_level = level
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def op_counts(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def initializer_dtypes(path) -> dict[str, int]:
    return {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer}


def constants(graph) -> dict[str, np.ndarray]:
    """Every initializer and ``Constant`` output of a graph, by name."""
    out = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            value = onnx.helper.get_attribute_value(n.attribute[0])
            is_tensor = isinstance(value, onnx.TensorProto)
            out[n.output[0]] = onnx.numpy_helper.to_array(value) if is_tensor else np.array(value)
    return out


def weight_dequantizers(graph) -> dict[str, onnx.NodeProto]:
    """The ``DequantizeLinear`` of each layer's integer weight codes, by layer name."""
    return {
        n.input[0].removesuffix(".codes"): n
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0].endswith(".codes")
    }


@pytest.mark.parametrize("per_channel", [True, False])
def test_uniform_mode_is_standard_qdq_run_by_integer_kernels(tmp_path, per_channel):
    net, x = build_model("uniform", per_channel=per_channel)
    with torch.no_grad():
        want = net(x)
    path = export_onnx(net, tmp_path / "u.onnx", x)
    ops = op_counts(path)
    # 5 input quantizers (QuantizeLinear + DequantizeLinear), 5 weight DequantizeLinear;
    # every input below 8 bits gets a Clip on its uint8 codes; BatchNorms are folded.
    assert ops["QuantizeLinear"] == 5 and ops["DequantizeLinear"] == 10
    assert ops["Clip"] == sum(b < 8 for b in A_BITS)
    assert not {"BatchNormalization", "Mul", "Gather"} & set(ops)
    inits = initializer_dtypes(path)
    tp = onnx.TensorProto
    assert inits["dw.codes"] == tp.INT8 and inits["fc.codes"] == tp.INT8
    assert not any(k.endswith(".weight") for k in inits)  # no float weights in the file
    graph = onnx.load(str(path)).graph
    codes = constants(graph)
    assert codes["pw.codes"].min() >= -2 and codes["pw.codes"].max() <= 1  # 2-bit grid
    # Weights: per-channel QDQ on axis 0 where per-channel, or where a BatchNorm was folded
    # in (conv, dw, c1); per-tensor otherwise. The integer step is the artifact's exactly.
    for name, layer in quantized_layers(net):
        dq = weight_dequantizers(graph)[name]
        scale, zero = codes[dq.input[1]], codes[dq.input[2]]
        axis = {a.name: a.i for a in dq.attribute}.get("axis", 1)
        q = layer.weight_quantizer
        if name in ("pw", "fc"):  # no BatchNorm after them: the quantizer's own scales
            step, _ = q.uniform_params()
            if per_channel:
                assert axis == 0 and scale.shape == zero.shape == (layer.weight.shape[0],)
                want_step = (q.channel_scales() * step).numpy()
                np.testing.assert_array_equal(scale, want_step)
                assert (zero == 0).all()  # int8 container of the signed grid
            else:
                assert scale.size == 1 and scale.item() == np.float32(step)
        else:
            assert axis == 0 and scale.shape == (layer.weight.shape[0],)

    optimized = tmp_path / "u.opt.onnx"
    got = run_ort(path, x, optimized)
    assert rel_diff(got, want) <= UNIFORM_TOL
    # ONNX Runtime replaced DequantizeLinear -> Conv -> QuantizeLinear by integer kernels.
    assert op_counts(optimized)["QLinearConv"] >= 2
    unfused = run_ort(path, x, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert rel_diff(unfused, want) <= UNIFORM_TOL


@pytest.mark.parametrize("per_channel", [True, False])
def test_adaptive_mode_is_index_gather_and_threshold_search(tmp_path, per_channel):
    net, x = build_model("adaptive", per_channel=per_channel)
    with torch.no_grad():
        want = net(x)
    path = export_onnx(net, tmp_path / "a.onnx", x)
    ops = op_counts(path)
    # b steps of Gather/Greater/Where per activation (O(N b)); no one-hot, no N x 2^b.
    assert ops["Greater"] == ops["Where"] == sum(A_BITS)
    assert not {"QuantizeLinear", "OneHot", "Equal", "ArgMin", "ArgMax"} & set(ops)
    # The three BatchNorms as Mul/Add; per-channel weights add Gather(table) * scales.
    assert ops["Mul"] == 3 + 5 * per_channel and ops["Add"] >= 3
    if per_channel:
        graph = onnx.load(str(path)).graph
        values = constants(graph)
        producers = {o: n for n in graph.node for o in n.output}
        layers = dict(quantized_layers(net))
        scaled = {}
        for mul in (n for n in graph.node if n.op_type == "Mul"):
            gather = producers.get(mul.input[0])
            if gather is None or gather.op_type != "Gather":
                continue
            name = gather.input[0].removesuffix(".table")
            scaled[name] = values[mul.input[1]]
        assert set(scaled) == set(layers)
        for name, scale in scaled.items():
            weight = layers[name].weight
            assert scale.shape == (weight.shape[0],) + (1,) * (weight.dim() - 1)
            want_scale = layers[name].weight_quantizer.channel_scales()
            np.testing.assert_array_equal(scale.reshape(-1), want_scale.numpy())
    inits = initializer_dtypes(path)
    assert all(
        inits[f"{n}.codes"] == onnx.TensorProto.UINT8 for n in ("conv", "dw", "pw", "c1", "fc")
    )
    assert rel_diff(run_ort(path, x), want) <= ADAPTIVE_TOL


@pytest.mark.parametrize("per_channel", [True, False])
def test_mixed_modes_and_a_loaded_runtime_export_the_same_graph(tmp_path, per_channel):
    net, x = build_model("mixed", per_channel=per_channel)
    with torch.no_grad():
        want = net(x)
    export(net, tmp_path / "m.safetensors")
    runtime = load(tmp_path / "m.safetensors", model=net)
    a = export_onnx(net, tmp_path / "from_model.onnx", x)
    b = export_onnx(runtime, tmp_path / "from_artifact.onnx", x, dynamic_batch=True)
    got_a, got_b = run_ort(a, x), run_ort(b, x)
    assert rel_diff(got_a, want) <= UNIFORM_TOL
    assert torch.equal(got_a, got_b)
    # dynamic_batch: another batch size runs and matches the loaded runtime.
    x2 = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert rel_diff(run_ort(b, x2), runtime(x2)) <= UNIFORM_TOL


class ReLU6Net(nn.Module):
    """MobileNet-style conv -> BN -> ReLU6 -> conv, where ReLU6 sits before a quantizer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu6(self.bn(self.a(x)))
        return self.c(nn.functional.relu6(self.bn2(self.b(x))))


@pytest.mark.parametrize("per_channel", [True, False])
def test_relu6_moves_onto_integer_codes_and_convs_fuse(tmp_path, per_channel):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 10, 10) * 2
    cfg = ddq.DDQConfig(
        weight=ddq.QuantizerConfig(mode="uniform", bits=4, per_channel=per_channel),
        activation=ddq.QuantizerConfig(mode="uniform", bits=4, signed=None),
        first_last_bits="learn",
    )
    net = ddq.prepare(ReLU6Net(), cfg, example_inputs=x[:1])
    # A range wider than 6 after the ReLU6s, so the clip matters (fresh BatchNorm
    # statistics kept: re-estimating them from this one batch would narrow it).
    ddq.calibrate(net, [x * 1.5], reestimate_bn=False)
    net.eval()
    with torch.no_grad():
        want = net(x)
    path = export_onnx(net, tmp_path / "r.onnx", x)
    graph = onnx.load(str(path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    for q in (n for n in graph.node if n.op_type == "QuantizeLinear"):
        assert producers.get(q.input[0], q).op_type != "Clip"  # no float clamp before Q
    optimized = tmp_path / "r.opt.onnx"
    assert rel_diff(run_ort(path, x, optimized), want) <= UNIFORM_TOL
    assert op_counts(optimized)["QLinearConv"] == 2


def test_export_onnx_rejects_plain_models_and_old_opsets(tmp_path):
    with pytest.raises(ValueError, match=r"ddq\.prepare.*ddq\.load"):
        export_onnx(nn.Sequential(nn.Linear(2, 2)), tmp_path / "x.onnx", torch.zeros(1, 2))
    net, x = build_model("adaptive")
    with pytest.raises(ValueError, match=r"opset_version must be in 18\.\.23, got 13"):
        export_onnx(net, tmp_path / "x.onnx", x, opset_version=13)


def test_onnx_file_is_self_contained(tmp_path):
    """The ONNX file is self-contained: weights inside, one input, one output."""
    net, x = build_model("uniform")
    path = export_onnx(net, tmp_path / "u.onnx", x)
    assert not list(tmp_path.glob("*.data"))
    model = onnx.load(str(path))
    assert len(model.graph.input) == 1 and len(model.graph.output) == 1
    assert model.opset_import[0].version >= 17
    assert np.isfinite(run_ort(path, x).numpy()).all()
