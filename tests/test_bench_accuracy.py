"""Smoke run of the accuracy benchmark and its table script so they cannot rot; the cache
keys and the tables script's refusals."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_accuracy_benchmark_quick(tmp_path):
    mod = _load("bench_accuracy")
    tables = _load("make_benchmarks_tables")
    methods = ["fp32", "lsq", "ddq-adaptive", "ddq-uniform"]
    if importlib.util.find_spec("brevitas") is not None:
        methods.append("brevitas")
    argv = ["--quick", "--out-dir", str(tmp_path), "--methods", *methods,
            "--ablation", "ddq-uniform-fixedbits", "4"]  # fmt: skip
    assert mod.main(argv) == 0
    data = json.loads((tmp_path / "accuracy.json").read_text())
    got = {r["method"] for r in data["rows"]}
    assert got == set(methods) | {"ddq-uniform-fixedbits"}
    fixed = next(r for r in data["rows"] if r["method"] == "lsq")
    for r in data["rows"]:
        if r["method"].startswith("ddq"):
            assert r["size_bytes"] <= fixed["size_bytes"] * (1 + 1e-9)  # same size budget
        if r["method"] != "fp32":  # every quantized method has its post-training score
            assert 0.0 <= r["ptq_mean"] <= 100.0
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    for r in runs:  # keyed on the settings and the code; the command is kept
        settings = json.loads(r["key"].split("|")[0])
        assert settings["code"].startswith(mod.ddq.__version__)
        assert settings["fp_epochs"] == 1 and settings["augment"] == 2
        assert r["command"].startswith("python benchmarks/bench_accuracy.py --quick")
    md = (tmp_path / "accuracy.md").read_text()
    assert "| mobilenet_v2 | W4A4 | 0 |" in md  # the goal check, paired on seed 0
    assert "post-training top-1" in md and "python benchmarks/bench_accuracy.py --quick" in md
    for png in ("pareto_size.png", "pareto_bitops.png", "mobilenet_v2_bits.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    # a second call reuses the cached runs instead of training again
    assert mod.main(argv) == 0
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == len(methods) + 1
    # the tables come back from the cache alone (a dirty tree needs --allow-dirty)
    out = ["--out-dir", str(tmp_path), "--allow-dirty"]
    assert tables.main(out) == 0
    text = (tmp_path / "tables.md").read_text()
    assert "| mobilenet_v2 | W4A4 | ddq-uniform-fixedbits | 1 |" in text
    assert tables.main([*out, "--check"]) == 0


def _record(code: str, method: str = "lsq", acc: float = 50.0) -> dict:
    key = json.dumps({"arch": "small_cnn", "seed": 0, "code": code, "fp_epochs": 1}, sort_keys=True)
    return {"key": f"{key}|{method}|4", "arch": "small_cnn", "seed": 0, "method": method,
            "bits": 4, "acc": acc, "ptq_acc": acc - 1, "size_bytes": 1e3, "gbitops": 0.1,
            "avg_w_bits": 4.0, "wall_s": 1.0, "command": "python benchmarks/bench_accuracy.py"}  # fmt: skip


def test_tables_refuse_mixed_commits_and_dirty_trees():
    tables = _load("make_benchmarks_tables")
    a, b = "0.1.0+aaaaaaaaaaaa", "0.1.0+bbbbbbbbbbbb"
    with pytest.raises(ValueError, match="mixes runs of 2 code versions"):
        tables.tables([_record(a), _record(b, "ddq-uniform")])
    text = tables.tables([_record(a, acc=61.0), _record(b, "ddq-uniform", 72.0)], code=b)
    assert "72.00" in text and "61.00" not in text  # only the chosen commit's runs
    with pytest.raises(ValueError, match="uncommitted changes"):
        tables.tables([_record(a + "+dirty")])
    assert "60.00" in tables.tables([_record(a + "+dirty", acc=60.0)], allow_dirty=True)


def test_cache_key_changes_with_every_protocol_setting():
    mod = _load("bench_accuracy")
    base = mod.parse_args(["--code", "0.1.0+aaaaaaaaaaaa"])
    key = mod._base_key("mobilenet_v2", 0, mod.settings_of(base))
    for flag, value in [("--fp-epochs", "29"), ("--qat-epochs", "5"), ("--augment", "0"),
                        ("--subset", "1000"), ("--batch-size", "32"), ("--fp-lr", "0.1"),
                        ("--calib-batches", "4"), ("--code", "0.1.0+bbbbbbbbbbbb")]:  # fmt: skip
        other = mod.parse_args(["--code", "0.1.0+aaaaaaaaaaaa", flag, value])
        assert mod._base_key("mobilenet_v2", 0, mod.settings_of(other)) != key, flag


def test_tables_name_the_runs_of_an_earlier_fp32_model():
    mod = _load("bench_accuracy")
    fp = _record("0.1.0+abc", "fp32", 98.0) | {"bits": 32, "finished": "2026-01-01T10:00:00Z"}
    old = _record("0.1.0+abc", "lsq") | {"finished": "2026-01-01T09:00:00Z"}
    new = _record("0.1.0+abc", "ddq-adaptive") | {"finished": "2026-01-01T11:00:00Z"}
    note = "\n".join(mod.start_note([fp, old, new]))
    assert "small_cnn seed 0: lsq 4" in note and "ddq-adaptive" not in note
    assert mod.start_note([fp, new]) == []
