"""Smoke run of the accuracy benchmark so the script cannot rot."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_accuracy.py"


@pytest.mark.slow
def test_accuracy_benchmark_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_accuracy", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_accuracy"] = mod
    spec.loader.exec_module(mod)
    methods = ["fp32", "lsq", "ddq-adaptive", "ddq-uniform"]
    if importlib.util.find_spec("brevitas") is not None:
        methods.append("brevitas")
    assert mod.main(["--quick", "--out-dir", str(tmp_path), "--methods", *methods]) == 0
    data = json.loads((tmp_path / "accuracy.json").read_text())
    got = {r["method"] for r in data["rows"]}
    assert got == set(methods)
    fixed = next(r for r in data["rows"] if r["method"] == "lsq")
    for r in data["rows"]:
        if r["method"].startswith("ddq"):
            assert r["size_bytes"] <= fixed["size_bytes"] * (1 + 1e-9)  # same size budget
    md = (tmp_path / "accuracy.md").read_text()
    assert "| mobilenet_v2 | W4A4 | 0 |" in md  # the goal check, paired on seed 0
    for png in ("pareto_size.png", "pareto_bitops.png", "mobilenet_v2_bits.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    # a second call reuses the cached runs instead of training again
    assert mod.main(["--quick", "--out-dir", str(tmp_path), "--methods", *methods]) == 0
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == len(methods)
