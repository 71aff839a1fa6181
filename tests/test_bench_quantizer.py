"""Smoke test of benchmarks/bench_quantizer.py and its exact O(N) memory check.

No timing is asserted (shared machines make timings noise); the saved-tensor bytes are
exact, so their per-element value must be identical at two sizes.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quantizer.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_quantizer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_quick_run_writes_every_case_with_linear_saved_memory(bench, tmp_path):
    report = bench.main(["--quick", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "quantizer.json").read_text())
    assert data["meta"]["sizes"] == report["meta"]["sizes"]
    sizes = data["meta"]["sizes"]
    assert len(set(sizes)) >= 2
    rows = {(r["case"], r["numel"]): r for r in data["results"]}
    assert set(rows) == {(c, n) for c in bench.CASES for n in sizes}
    for (case, _), r in rows.items():
        assert r["total_ms"] > 0 and r["fwd_ms"] > 0
        assert r["ratio_total"] > 0
        if case == bench.BASELINE:
            assert r["ratio_total"] == 1.0
    for case in bench.CASES:
        saved = [rows[case, n]["saved"] for n in sizes]
        # O(N): the same bytes per element at every size, plus the same fixed bytes.
        assert len({s["per_element_bytes"] for s in saved}) == 1, case
        assert len({s["fixed_bytes"] for s in saved}) == 1, case
    ddq_saved = rows["ddq_uniform_8bit", sizes[0]]["saved"]["per_element_bytes"]
    assert ddq_saved <= 2  # a uint8 level index and a bool mask
    assert rows[bench.BASELINE, sizes[0]]["saved"]["per_element_bytes"] == 1  # its mask
    markdown = (tmp_path / "quantizer.md").read_text()
    for case in bench.CASES:
        assert f"| {case} |" in markdown


def test_peak_rss_child_reports_a_measurement(bench):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak RSS reset needs Linux /proc")
    rss = bench.rss_in_subprocess("ddq_uniform_8bit", 1 << 16, seed=0, threads=1)
    assert rss is not None
    assert rss["peak_delta_bytes"] >= 0
