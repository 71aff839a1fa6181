"""The ``int8`` preset's fast path: adaptive weights exported as per-channel int8 codes, so
ONNX Runtime runs every conv and matrix product as an integer kernel, while the artifact
keeps its b-bit indices.

Oracles: ONNX Runtime's optimized graph (the structure), the exact ``Gather`` export of
the same model run in ONNX Runtime (the numbers: the int8 form may differ only by the
mapping of each level onto the int8 grid), and :func:`adaptive_to_int8` on the
artifact's own levels (the reported mapping error).
"""

from __future__ import annotations

import collections

import pytest
import torch

import ddq
from ddq.conversion.output_quantizers import output_quantizers
from ddq.conversion.presets import preset
from ddq.deploy import export, export_onnx, load
from ddq.deploy.int8_codes import adaptive_to_int8
from ddq.layers import QuantLayer
from ddq.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

INTEGER_OPS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger"}
FLOAT_PRODUCTS = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


@pytest.fixture(scope="module")
def int8_model():
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1, small_input=True)
    x = torch.randn(32, 1, 28, 28)
    cfg = preset("int8", integer_graph=True)
    # Free levels (off the int8 grid): this file checks the mapping itself and its reported
    # error; the preset's own grid-trained levels, which map exactly, are checked in
    # tests/test_level_grid.py.
    cfg.weight = cfg.weight.replace("test", bits=4, level_grid=None)
    cfg.activation = cfg.activation.replace("test", bits=4, signed=None)
    ddq.prepare(model, cfg, example_inputs=x[:1])
    ddq.calibrate(model, [x], method="percentile")
    return model.eval(), x


def _session(path, optimize: bool, tmp_path=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if tmp_path is not None:
        so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), so


def _run(path, x, optimize=True):
    s, _ = _session(path, optimize)
    return torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])


def test_int8_preset_exports_integer_kernels(tmp_path, int8_model):
    model, x = int8_model
    layers = [n for n, m in model.named_modules() if isinstance(m, QuantLayer)]
    report: dict = {}
    path = export_onnx(model, tmp_path / "int8.onnx", x[:1], dynamic_batch=True, report=report)
    # Every layer is adaptive with a uniform input, so every layer is mapped ...
    assert set(report["int8_mapping"]) == set(layers)
    _, so = _session(path, True, tmp_path)
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    # ... and runs as an integer kernel, as in uniform mode.
    assert sum(ops[o] for o in INTEGER_OPS) == len(layers), ops
    assert not FLOAT_PRODUCTS & set(ops), ops
    # The weights are int8 initializers in the file itself (not decoded by a Gather on the
    # levels, which the exact export keeps, one per layer).
    exact = export_onnx(model, tmp_path / "table.onnx", x[:1], adaptive_weights="table")
    raw = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    raw_exact = collections.Counter(n.op_type for n in onnx.load(str(exact)).graph.node)
    assert raw_exact["Gather"] - raw["Gather"] == len(layers)
    assert raw["DequantizeLinear"] - raw_exact["DequantizeLinear"] == len(layers)


def test_mapping_error_is_the_artifacts_levels_on_int8(tmp_path, int8_model):
    model, x = int8_model
    report: dict = {}
    export_onnx(model, tmp_path / "m.onnx", x[:1], report=report)
    runtime = load(export(model, tmp_path / "m.ddq").path, model=model)
    for name, err in report["int8_mapping"].items():
        layer = runtime.get_submodule(name)
        want = adaptive_to_int8(layer.weight_table, layer.weight_codes(), layer.weight_scale)
        assert err == pytest.approx(want.relative_rmse, rel=1e-6)
        # 16 levels onto 255: a small but nonzero error (levels are not on the int8 grid).
        assert 0 < err < 0.02


def test_int8_numbers_are_the_mapped_weights(tmp_path, int8_model):
    model, x = int8_model
    fast = export_onnx(model, tmp_path / "fast.onnx", x[:1], dynamic_batch=True)
    # Oracle: the deploy runtime with each layer's decoded weight replaced by its int8 form.
    runtime = load(export(model, tmp_path / "m.ddq").path, model=model)
    with torch.no_grad():
        exact = runtime(x)
        for m in runtime.modules():
            if hasattr(m, "weight_table"):
                m.weight.copy_(
                    adaptive_to_int8(m.weight_table, m.weight_codes(), m.weight_scale)
                    .dequantize()
                    .view_as(m.weight)
                )
        want = runtime(x)
    step = output_quantizers(model)[model.ddq_state.last].uniform_params()[0]
    got = _run(fast, x, optimize=False)
    # ONNX Runtime's QDQ arithmetic in float is that model up to float rounding (a value
    # within rounding of a threshold moves a step) ...
    err = (got - want).abs() / step
    assert err.median() == 0 and err.max() <= 2, err.max()
    # ... and not the exact one (the mapping moved some logits).
    assert not torch.equal(want, exact)
    # The integer kernels on top change the numbers no more than in uniform mode.
    fused = _run(fast, x, optimize=True)
    assert ((fused - got).abs() / step).median() <= 1


def test_bad_option_is_named(tmp_path, int8_model):
    model, x = int8_model
    with pytest.raises(ValueError, match="adaptive_weights must be one of"):
        export_onnx(model, tmp_path / "x.onnx", x[:1], adaptive_weights="int4")
