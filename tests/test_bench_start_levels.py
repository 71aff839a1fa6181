"""Smoke tests of benchmarks/bench_start.py and bench_levels.py (tiny data, seconds)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _main(name: str):
    sys.path.insert(0, str(BENCH))  # bench_levels imports bench_start
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(autouse=True)
def _clean_modules():
    yield
    for name in ("bench_start", "bench_levels"):
        sys.modules.pop(name, None)
    if str(BENCH) in sys.path:
        sys.path.remove(str(BENCH))


@pytest.mark.slow
def test_start_quality_covers_both_modes_granularities_and_calibrations(tmp_path):
    _main("bench_start")(["--quick", "--out", str(tmp_path), "--cache", str(tmp_path)])
    data = json.loads((tmp_path / "start.json").read_text())
    seen = {(r["mode"], r["per_channel"], r["act_calibration"]) for r in data["rows"]}
    assert len(seen) == 8
    for r in data["rows"]:
        assert 0 <= r["acc"] <= 100 and r["delta"] == pytest.approx(r["acc"] - r["fp32_acc"])
        if r["mode"] == "uniform":  # the start is the MSE-searched grid itself
            assert r["median_vs_uniform"] == pytest.approx(1.0, rel=1e-3)
        else:
            assert r["median_vs_kmeans"] == pytest.approx(1.0, rel=0.02)
    assert "| adaptive | per-channel | W4A4 |" in (tmp_path / "start.md").read_text()


@pytest.mark.slow
def test_level_learning_frozen_levels_do_not_move(tmp_path):
    _main("bench_levels")(["--quick", "--out", str(tmp_path), "--cache", str(tmp_path),
                           "--variants", "frozen", "adam:0.01"])  # fmt: skip
    results = json.loads((tmp_path / "levels.json").read_text())["results"]
    assert set(results) == {"frozen", "adam:0.01"}
    assert results["frozen"][-1]["median_levels_moved"] == 0.0
    assert results["adam:0.01"][-1]["median_levels_moved"] > 0.0
    assert results["frozen"][-1]["median_weights_moved"] > 0.0
    assert (tmp_path / "levels.png").stat().st_size > 0
