"""Adaptive levels trained on an integer grid (``QuantizerConfig.level_grid``, set for the
weights by the ``int8`` preset): the forward, the frozen table and the int8 export's codes
are one set of numbers, so the deployed graph runs the weights that were trained.

Oracles: the grid formula ``round(top * level / L) * L / top`` in float64 on the levels of
a twin quantizer without the grid (same parameters); autograd through an explicit
straight-through formulation for the gradients; the PyTorch model itself for
``adaptive_to_int8`` and ONNX Runtime.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import ddq
from ddq.conversion import DDQConfig, QuantizerConfig
from ddq.conversion.output_quantizers import output_quantizers
from ddq.conversion.presets import preset
from ddq.deploy import export, export_onnx, load
from ddq.deploy.int8_codes import adaptive_to_int8
from ddq.jobs.run import RunConfig
from ddq.layers import QuantLayer
from ddq.models import create_model
from ddq.quantizer import (
    AdaptiveIndexer,
    DDQQuantizer,
    kronecker_merge,
    snap_to_grid,
    table_lookup,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _twins(
    grid: int, bits: int, signed: bool = True, channels: int | None = 6
) -> tuple[DDQQuantizer, DDQQuantizer, torch.Tensor]:
    """A quantizer on the ``grid``-bit grid and its free twin (same state), fitted to ``w``."""
    w = torch.randn(channels or 6, 5, 3) * torch.linspace(0.2, 2.0, channels or 6).view(-1, 1, 1)
    if not signed:
        w = w.relu()
    free = DDQQuantizer(max_bits=8, mode="adaptive", signed=signed, channels=channels)
    free.set_bits(bits, trainable=True)
    free.init_from(w)
    with torch.no_grad():  # levels off any grid, as after training
        free.raw_gaps.add_(0.3 * torch.randn_like(free.raw_gaps))
    gridded = DDQQuantizer(
        max_bits=8, mode="adaptive", signed=signed, channels=channels, level_grid=grid
    )
    gridded.load_state_dict(free.state_dict())
    return gridded, free, w


def _grid_oracle(levels: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes and grid values of ``levels``, in float64."""
    top = 2 ** (grid - 1) - 1
    v = levels.double()
    peak = v.abs().max()
    codes = torch.round(top * v / peak)
    return codes, codes * peak / top


@pytest.mark.parametrize(
    "grid, bits, signed, channels",
    [(8, 4, True, 6), (8, 8, True, 6), (4, 3, True, None), (8, 3, False, None), (3, 4, True, 6)],
    ids=["int8-w4", "int8-w8", "int4-per-tensor", "int8-unsigned", "coarser-grid-than-levels"],
)
def test_levels_and_forward_are_the_grid_values(grid, bits, signed, channels):
    qz, free, w = _twins(grid, bits, signed, channels)
    codes, want = _grid_oracle(free.levels(), grid)
    got = qz.levels()
    top = 2 ** (grid - 1) - 1
    step = float(got.abs().max()) / top
    # Same integer codes as the oracle; values within float rounding of it.
    assert torch.equal(torch.round(got.double() / step), codes)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0.0)
    if not signed:
        assert got[0] == 0  # a ReLU's zeros stay exact zeros
    # The forward is the levels at the free twin's indices (the grid moves values, not the
    # nearest-fine-level search), times the channel scale, bit for bit.
    idx = qz.indices(w)
    assert torch.equal(idx, free.indices(w))
    scales = qz.channel_scales()
    expect = got[idx] if scales is None else got[idx] * scales.view(-1, 1, 1)
    assert torch.equal(qz(w), expect)
    qz.eval()
    assert torch.equal(qz(w), expect)  # eval as training


def test_snap_to_grid_is_straight_through():
    v = torch.tensor([-0.9, -0.31, 0.0, 0.2, 0.55, 1.3], requires_grad=True)
    g = torch.randn(6)
    (grad,) = torch.autograd.grad((snap_to_grid(v, 8) * g).sum(), v)
    assert torch.equal(grad, g)
    assert torch.equal(snap_to_grid(torch.zeros(4), 8), torch.zeros(4))
    with pytest.raises(ValueError, match="grid_bits"):
        snap_to_grid(v, 1)


def test_level_gradients_are_the_explicit_straight_through_ones():
    qz, free, w = _twins(8, 4)
    qz.grad_scale = free.grad_scale = False  # the LSQ factor is not what is checked here
    # Explicit formulation, autograd through the documented pieces: fine levels, Kronecker
    # merge, the merged levels moved onto the oracle's grid by a detached difference
    # (straight-through), then the lookup of ``w / scale`` times the channel scale.
    q = free.fine_levels()
    v = kronecker_merge(q, free.gates())
    v_grid = v + (_grid_oracle(v.detach(), 8)[1].float() - v).detach()
    scale = (free.channel_ref * torch.exp(free.log_channel_scale)).view(-1, 1, 1)
    y_explicit = table_lookup(w / scale, v_grid, AdaptiveIndexer(q.detach())) * scale
    y_grid = qz(w)
    torch.testing.assert_close(y_grid, y_explicit, rtol=1e-6, atol=1e-9)
    g = torch.randn_like(w)
    (y_grid * g).sum().backward()
    (y_explicit * g).sum().backward()
    for name, p in qz.named_parameters():
        want = dict(free.named_parameters())[name].grad
        assert p.grad is not None and want is not None, name
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7)
    assert qz.raw_gaps.grad.abs().sum() > 0  # the levels learn


def test_config_validation_and_round_trip():
    for bad in (1, 9, True, 8.0, "8"):
        with pytest.raises(ValueError, match=r"DDQConfig\.weight: level_grid"):
            DDQConfig.from_dict({"weight": {"level_grid": bad}})
        with pytest.raises(ValueError, match="level_grid"):
            QuantizerConfig(level_grid=bad).validate()
    with pytest.raises(ValueError, match=r"by_name\['fc'\]\.weight: level_grid"):
        DDQConfig(by_name={"fc": {"weight": {"level_grid": 0}}}).validate()
    with pytest.raises(ValueError, match="level_grid is for adaptive levels"):
        DDQQuantizer(mode="uniform", level_grid=8)
    # The config ignores it in uniform mode (a preset's override may switch a layer).
    assert QuantizerConfig(mode="uniform", level_grid=8).build().level_grid is None
    assert QuantizerConfig(level_grid=8).build(channels=3).level_grid == 8
    cfg = preset("int8")
    assert DDQConfig.from_dict(cfg.to_dict()) == cfg
    assert DDQConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).weight.level_grid == 8
    # A config written before the field existed loads with free levels.
    old = cfg.to_dict()
    del old["weight"]["level_grid"], old["activation"]["level_grid"]
    assert DDQConfig.from_dict(old).weight.level_grid is None
    # The run folder's config.json (what --resume and `ddq export` re-prepare from).
    run = RunConfig(ddq=cfg.to_dict())
    again = RunConfig.from_dict(json.loads(json.dumps(run.to_dict())))
    assert again.ddq_config().weight.level_grid == 8


def _loss(m, batch):
    return F.cross_entropy(m(batch[0]), batch[1])


@pytest.fixture(scope="module")
def trained():
    """small_cnn under the int8 preset: calibrated, trained a few steps, finalized."""
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1, small_input=True)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    ddq.prepare(model, preset("int8", first_last_bits="learn"), example_inputs=x[:1])
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    config = ddq.TrainConfig(epochs=1, freeze_epochs=0, fit_batches=1, progress=False)
    trainer = ddq.DDQTrainer(model, ddq.Budget(avg_weight_bits=5.0), config, steps_per_epoch=4)
    trainer.calibrate([b[0] for b in batches])
    opt = trainer.optimizer()
    for batch in batches:
        loss = trainer.loss(_loss(model, batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        trainer.step()
    trainer.finalize(batches, _loss)
    return model.eval(), x


def test_trained_levels_export_to_int8_exactly(trained, tmp_path):
    model, x = trained
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    assert all(m.weight_quantizer.level_grid == 8 for m in layers.values())
    assert {m.weight_quantizer.bits for m in layers.values()} != {8}  # learned, mixed bits
    for m in layers.values():
        wq = m.weight_quantizer
        # The forward first: it re-fits the levels if finalize moved the bitwidth.
        values = wq(m.weight).detach()
        table, scales = wq.levels(), wq.channel_scales()
        mapped = adaptive_to_int8(table, wq.indices(m.weight), scales)
        assert mapped.relative_rmse < 1e-6 and mapped.max_level_error < 1e-3
        codes, _ = _grid_oracle(table, 8)
        assert torch.equal(mapped.level_codes.double(), codes)
        # The int8 form is the trained weight up to float rounding.
        torch.testing.assert_close(mapped.dequantize(), values, rtol=1e-6, atol=1e-9)
    report: dict = {}
    export_onnx(model, tmp_path / "m.onnx", x[:1], report=report)
    assert set(report["int8_mapping"]) == set(layers)
    assert max(report["int8_mapping"].values()) < 1e-6
    # The artifact stores these levels as they are (no manifest change): reloaded exactly.
    runtime = load(export(model, tmp_path / "m.ddq").path, model=model)
    with torch.no_grad():
        torch.testing.assert_close(runtime(x), model(x), rtol=0, atol=1e-6)


def test_onnx_runtime_computes_the_trained_model(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, x = trained
    path = export_onnx(model, tmp_path / "m.onnx", x[:1], dynamic_batch=True)
    with torch.no_grad():
        want = model(x)
    step = output_quantizers(model)[model.ddq_state.last].uniform_params()[0]

    def run(optimize: bool) -> torch.Tensor:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])

    # The QDQ graph in float is the trained model up to float rounding: the logits are
    # output codes, almost all identical (a value within rounding of a threshold moves a
    # step), with no mapping error left to move them.
    err = (run(False) - want).abs() / step
    assert err.median() == 0 and float((err > 0.5).float().mean()) < 0.02, err.max()
    assert err.max() <= 2
    # ONNX Runtime's integer kernels on top (bias rounded to the accumulator step).
    fused = (run(True) - want).abs() / step
    assert fused.median() == 0 and fused.max() <= 4, fused.max()
