"""Smoke test of benchmarks/bench_train_step.py (no timing is asserted: shared machines)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_step.py"


@pytest.mark.slow
def test_quick_run_times_every_case_against_the_same_runs_fp32(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        module.main(["--quick", "--out-dir", str(tmp_path)])
    finally:
        sys.modules.pop(spec.name, None)
    data = json.loads((tmp_path / "train_step.json").read_text())
    cases = {r["case"]: r for r in data["rows"]}
    expected = {"fp32", "lsq_w4a4", "ddq_uniform", "ddq_adaptive"}
    if importlib.util.find_spec("brevitas") is not None:
        expected.add("brevitas_w4a4")
    assert set(cases) == expected
    assert cases["fp32"]["ratio_fp32"] == 1.0
    for r in data["rows"]:
        assert r["ms"] > 0 and r["ratio_fp32"] == pytest.approx(r["ms"] / cases["fp32"]["ms"])
    md = (tmp_path / "train_step.md").read_text()
    assert all(f"| {c} |" in md for c in expected)
