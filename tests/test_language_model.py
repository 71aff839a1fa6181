"""The language-model example (``examples/language_model.py``) in a tiny configuration of
the same code path: FP32 training lowers the loss, DDQ through ``DDQTrainer`` meets the
budget, and ``ddq.export`` + ``ddq.load`` reproduce the quantized model's logits exactly.
Also the stdlib text loader and ``TinyLM`` on their own."""

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ddq
from ddq.data.stdlib_text import (
    TRAIN_FILES,
    VAL_FILES,
    load_stdlib_text,
    random_windows,
    sequential_windows,
    stdlib_dir,
)
from ddq.layers import QuantLinear
from ddq.models.tiny_lm import TinyLM

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "language_model.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("ddq_example_language_model", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_stdlib_text_is_pinned_split_and_hashed():
    text = load_stdlib_text()
    assert not set(TRAIN_FILES) & set(VAL_FILES)
    expected = sum((stdlib_dir() / f).stat().st_size for f in TRAIN_FILES) + 2 * (
        len(TRAIN_FILES) - 1
    )
    assert text.train.numel() == expected and text.train.dtype == torch.uint8
    raw = (stdlib_dir() / VAL_FILES[0]).read_bytes()
    assert bytes(text.val[: len(raw)].tolist()) == raw  # the bytes themselves, in order
    again = load_stdlib_text()
    assert again.sha256 == text.sha256 and len(text.sha256) == 64
    other = load_stdlib_text(TRAIN_FILES[1:], VAL_FILES)
    assert other.sha256 != text.sha256
    info = text.describe()
    assert info["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert info["train_files"] == list(TRAIN_FILES) and info["vocab_size"] == 256


def test_stdlib_text_names_a_missing_file(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    with pytest.raises(FileNotFoundError, match=r"'b\.py'.*Python"):
        load_stdlib_text(["a.py"], ["b.py"], directory=tmp_path)
    with pytest.raises(ValueError, match="both splits"):
        load_stdlib_text(["a.py"], ["a.py"], directory=tmp_path)


def test_windows_are_next_byte_pairs():
    tokens = torch.arange(200, dtype=torch.uint8)
    x, y = random_windows(tokens, 16, 4, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(y, x + 1)
    seen = torch.cat([y.flatten() for _, y in sequential_windows(tokens, 16, 3)])
    assert torch.equal(seen, torch.arange(1, 1 + 16 * (199 // 16)))  # each once, in order


def test_tiny_lm_is_causal_and_all_linear():
    torch.manual_seed(0)
    model = TinyLM(d_model=16, n_layers=2, n_heads=2, seq_len=12).eval()
    x = torch.randint(0, 256, (2, 12))
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.equal(a[:, :7], b[:, :7]) and not torch.equal(a[:, 7:], b[:, 7:])
    assert sum(type(m) is nn.Linear for m in model.modules()) == 2 * 6 + 1
    assert TinyLM(**model.arch()["kwargs"]).arch() == model.arch()


def _tiny(example):
    cfg = dataclasses.replace(
        example.quick_config(),
        d_model=32, n_layers=2, seq_len=16, batch_size=8, fp32_steps=40, fp32_warmup=4,
        ddq_epochs=2, ddq_steps_per_epoch=3, calib_batches=1, fit_batches=1,
        eval_windows=8, curve_every=10, budgets=(4.0,),
    )  # fmt: skip
    return cfg


def test_the_example_end_to_end_in_a_tiny_configuration(example, tmp_path, one_thread):
    cfg = _tiny(example)
    results = example.run(cfg, tmp_path / "results", tmp_path / "work", log=lambda _: None)
    # FP32 training lowers the loss (the first interval starts from ln 256 = 5.5).
    curve = [loss for _, loss in results["fp32"]["curve"]]
    assert len(curve) == 4 and curve[-1] < curve[0] - 0.5
    assert math.isfinite(results["fp32"]["ppl"]) and results["fp32"]["ppl"] < 256

    (entry,) = results["ddq"]
    model = results["_models"]["ddq4"]
    # The budget holds after finalize, and every bit is frozen.
    assert entry["budget_usage"] <= 1 + 1e-9 and entry["avg_weight_bits"] <= 4 + 1e-9
    assert ddq.CostModel(model).avg_weight_bits() == pytest.approx(entry["avg_weight_bits"])
    qs = ddq.layers.quantizers_of(model).values()
    assert all(int(q.floor) == int(q.ceiling) == q.bits for q in qs)
    linears = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 6 + 1
    assert [r["name"] for r in entry["layers"] if r["w_bits"] < 32] == linears
    assert entry["max_abs_logit_diff_after_load"] == 0.0

    # Export + load, checked here against the fake-quantized model itself.
    path = tmp_path / "lm.ddq.safetensors"
    ddq.export(model, path, arch=model.arch())
    runtime = ddq.load(path, model_factory=lambda arch: TinyLM(**arch["kwargs"]))
    x = torch.randint(0, 256, (4, cfg.seq_len))
    model.eval()
    with torch.no_grad():
        assert torch.equal(runtime(x), model(x))

    # The results say what was trained on, and the markdown carries the table.
    written = json.loads((tmp_path / "results" / "language_model.json").read_text())
    assert written["data"]["sha256"] == load_stdlib_text().sha256
    assert written["data"]["python_version"] == results["environment"]["python"]
    md = (tmp_path / "results" / "language_model.md").read_text()
    assert "| DDQ, budget 4 bits |" in md and "blocks.1.fc2" in md
    # The control (FP32 trained on as long as DDQ trains) is measured and compared with.
    control = results["fp32_continued"]
    assert control["steps"] == cfg.ddq_epochs * cfg.ddq_steps_per_epoch
    assert entry["ppl_vs_fp32_continued"] == pytest.approx(entry["ppl"] / control["ppl"] - 1)
    assert "(control)" in md
    # Reusing the saved FP32 weights gives the same FP32 figures without training.
    again = example.run(
        dataclasses.replace(cfg, budgets=()), None, tmp_path / "work",
        fp32_from=tmp_path / "work" / "fp32.pt", log=lambda _: None,
    )  # fmt: skip
    assert again["fp32"]["ppl"] == results["fp32"]["ppl"]
