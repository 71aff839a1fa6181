"""The ddq command line end to end on a subset of the embedded MNIST data."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ddq.cli.main import main

QUICK = ["--model", "small_cnn", "--subset", "256", "--batch-size", "64", "--epochs", "2",
         "--fp-epochs", "1", "--first-last", "learn", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    assert (
        main(["quantize", *QUICK, "--avg-bits", "4", "--max-act-bits", "4", "--out", str(out)]) == 0
    )
    return out


def test_quantize_meets_the_budget_and_layers_differ(finished_run):
    report = json.loads((finished_run / "report.json").read_text())
    totals = report["totals"]
    assert totals["budget_met"] and totals["budget_usage"] <= 1.0
    assert totals["avg_weight_bits"] <= 4.0
    quantized = [r for r in report["layers"] if r["mode"] != "float"]
    assert len({r["w_bits"] for r in quantized}) > 1
    assert all(r["a_bits"] <= 4 for r in quantized)
    for name in ("report.md", "history.csv", "config.json", "model.safetensors", "checkpoint.pt"):
        assert (finished_run / name).is_file(), name
    for png in ("bits_per_layer.png", "levels.png", "training.png"):
        assert (finished_run / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((finished_run / "config.json").read_text())
    assert saved["budget"] == {"avg_weight_bits": 4.0, "max_act_bits": 4}


def test_eval_and_report_commands(finished_run, capsys):
    assert main(["eval", str(finished_run)]) == 0
    acc = float(capsys.readouterr().out.split("test accuracy ")[1].split("%")[0])
    result = json.loads((finished_run / "result.json").read_text())
    # printed with 2 decimals (40.625 prints as 40.62: a hair over 0.005 in floats)
    assert acc == pytest.approx(result["ddq_acc"], abs=0.0051)
    (finished_run / "report.md").unlink()
    assert main(["report", str(finished_run)]) == 0
    assert (finished_run / "report.md").is_file()


def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path, monkeypatch, finished_run):
    import ddq.training.loop as loop

    real_save = loop.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        raise KeyboardInterrupt("simulated kill after epoch 1")

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    out = tmp_path / "r"
    args = ["quantize", *QUICK, "--avg-bits", "4", "--max-act-bits", "4", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert main([*args, "--resume"]) == 0
    resumed = load_file(out / "model.safetensors")
    uninterrupted = load_file(finished_run / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:
        assert torch.equal(resumed[k], uninterrupted[k]), k


def test_settings_from_a_yaml_file_are_used_and_saved(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: small_cnn\nsubset: 128\nfp_epochs: 0\nbudget:\n  size_ratio: 0.2\n"
                   "train:\n  epochs: 1\n  freeze_epochs: 0\n  progress: false\n"
                   "ddq:\n  first_last_bits: learn\n")  # fmt: skip
    out = tmp_path / "r"
    assert main(["quantize", "--config", str(cfg), "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["budget"] == {"size_ratio": 0.2} and saved["train"]["epochs"] == 1
    assert json.loads((out / "report.json").read_text())["totals"]["size_ratio_vs_fp32"] <= 0.2


def test_weights_are_per_channel_unless_per_tensor_is_asked_for(tmp_path, finished_run):
    from ddq.jobs.run import load_run

    model, _ = load_run(finished_run)
    wq = dict(model.named_modules())["features.0.0"].weight_quantizer
    assert wq.channels == 16 and wq.channel_scales().shape == (16,)
    out = tmp_path / "pt"
    args = ["--model", "small_cnn", "--subset", "128", "--fp-epochs", "0", "--epochs", "1",
            "--freeze-epochs", "0", "--first-last", "learn", "--no-progress", "--per-tensor",
            "--out", str(out)]  # fmt: skip
    assert main(["quantize", *args]) == 0
    assert json.loads((out / "config.json").read_text())["ddq"]["weight"]["per_channel"] is False
    model, _ = load_run(out)
    assert all(
        q.channels is None for n, q in model.named_modules() if n.endswith("weight_quantizer")
    )


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--avg-bits", "1.0"], "smallest feasible"),
        (["--dataset", "cifar10", "--data-root", "/nonexistent/cifar"], "/nonexistent/cifar"),
        (["--model", "alexnet"], "unknown model"),
        (["--weights", "WEIGHTS"], "cannot|not a|invalid|corrupt|unreadable"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_training(tmp_path, capsys, extra, match):
    weights = tmp_path / "broken.safetensors"
    weights.write_bytes(b"this is not a weights file")
    extra = [str(weights) if a == "WEIGHTS" else a for a in extra]
    out = tmp_path / "r"
    assert main(["quantize", *QUICK, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error" in err and __import__("re").search(match, err), err
    assert not (out / "checkpoint.pt").exists() and not (out / "fp32.safetensors").exists()


@pytest.mark.parametrize("cmd", [[], ["quantize"], ["eval"], ["report"], ["list"]])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: ddq" in capsys.readouterr().out
