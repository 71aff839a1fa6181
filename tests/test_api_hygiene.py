"""API hygiene (issue 11, item 5): run folders are created, settings of the wrong type are
rejected naming the key, an empty conversion is an error, the library logs instead of
printing, and an unavailable device is a one-line CLI error."""

import ast
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ddq
from ddq import Budget, DDQConfig, QuantizerConfig
from ddq.cli.main import main
from ddq.jobs import check_device
from ddq.training import TrainConfig, train_ddq

SRC = Path(__file__).resolve().parents[1] / "src" / "ddq"


def _tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )  # fmt: skip


def _loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=16), DataLoader(data, batch_size=16)


def _train(run_dir=None) -> ddq.training.TrainResult:
    torch.manual_seed(0)
    model = ddq.prepare(
        _tiny_net(), DDQConfig(first_last_bits="learn"), example_inputs=torch.zeros(1, 1, 8, 8)
    )
    cfg = TrainConfig(epochs=1, freeze_epochs=0, calib_batches=1, fit_batches=1, progress=False)
    train, test = _loaders()
    return train_ddq(model, train, test, Budget(avg_weight_bits=6), cfg, run_dir=run_dir)


# -- 1. run folders ------------------------------------------------------------------


def test_train_ddq_creates_a_missing_run_dir(tmp_path):
    run_dir = tmp_path / "not" / "yet" / "there"
    result = _train(run_dir)
    assert (run_dir / "history.csv").is_file() and (run_dir / "checkpoint.pt").is_file()
    assert len(result.history) == 1


# -- 2. settings of the wrong type ---------------------------------------------------


@pytest.mark.parametrize(
    "d, match",
    [
        ({"weight": {"signed": "yes"}}, r"DDQConfig\.weight: signed"),
        ({"activation": {"signed": 1}}, r"DDQConfig\.activation: signed"),
        ({"weight": {"grad_scale": "no"}}, r"DDQConfig\.weight: grad_scale"),
        ({"weight": {"per_channel": 1}}, r"DDQConfig\.weight: per_channel"),
        ({"weight": {"max_bits": True}}, r"DDQConfig\.weight: max_bits"),
        ({"weight": {"max_bits": 4.0}}, r"DDQConfig\.weight: max_bits"),
        ({"activation": {"min_bits": "2"}}, r"DDQConfig\.activation: min_bits"),
        ({"weight": {"bits": False}}, r"DDQConfig\.weight: bits"),
        ({"activation": {"mode": ["uniform"]}}, r"DDQConfig\.activation: unknown mode"),
        ({"weight": {"colour": 1}}, r"DDQConfig\.weight: unknown quantizer setting"),
        ({"weight": 4}, r"DDQConfig\.weight must be a mapping"),
        ({"weight": None}, r"DDQConfig\.weight must be a mapping"),
        ({"activation": "uniform"}, r"DDQConfig\.activation must be a mapping"),
        ({"skip": "fc"}, r"skip must be a list"),
        ({"skip": ["fc", 3]}, r"skip must be a list"),
        ({"first_last_bits": True}, r"first_last_bits"),
        ({"first_last_bits": "8"}, r"first_last_bits"),
        ({"quantize_network_input": "no"}, r"quantize_network_input"),
        ({"by_type": ["Conv2d"]}, r"by_type must be a mapping"),
        ({"by_type": {1: {"weight": {}}}}, r"by_type keys must be strings"),
        ({"by_name": {("fc",): {"weight": {}}}}, r"by_name keys must be strings"),
        ({"by_name": {"fc": {"weight": "4bit"}}}, r"by_name\['fc'\]\.weight must be a mapping"),
        ({"by_name": {"fc": {"weight": {"signed": "yes"}}}}, r"by_name\['fc'\]\.weight: signed"),
        ({"by_type": {"Linear": {"activation": {"bits": 9}}}}, r"by_type\['Linear'\]\.activation"),
        ({"by_type": {"Linear": {"bias": {}}}}, r"by_type\['Linear'\] must be a dict"),
        ({"size": 3}, r"unknown DDQConfig key"),
    ],
)
def test_ddq_config_rejects_wrong_types_naming_the_key(d, match):
    with pytest.raises(ValueError, match=match):
        DDQConfig.from_dict(d)


def test_ddq_config_from_dict_still_round_trips_and_rejects_a_non_mapping():
    cfg = DDQConfig(
        by_type={"depthwise": {"weight": {"min_bits": 4}}},
        by_name={"fc": {"activation": None}},
        skip=["head.*"],
        first_last_bits="learn",
    )
    assert DDQConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="mapping"):
        DDQConfig.from_dict("weight: 4")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_bits": True}, "max_bits"),
        ({"min_bits": 2.5}, "min_bits"),
        ({"bits": True}, "bits"),
        ({"signed": "yes"}, "signed"),
        ({"grad_scale": "no"}, "grad_scale"),
        ({"per_channel": None}, "per_channel"),
        ({"mode": None}, "mode"),
        ({"max_bits": 4, "min_bits": 5}, "min_bits"),
        ({"max_bits": 4, "bits": 6}, "bits"),
    ],
)
def test_quantizer_config_validates_every_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizerConfig(**kwargs).validate()
    with pytest.raises(ValueError, match=match):
        QuantizerConfig(**kwargs).build()


def test_an_override_combination_is_checked_naming_the_layer():
    cfg = DDQConfig(
        by_type={"Conv2d": {"weight": {"max_bits": 4, "bits": 8}}}, first_last_bits="learn"
    )
    with pytest.raises(ValueError, match=r"layer '0' weight"):
        ddq.prepare(_tiny_net(), cfg)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"avg_weight_bits": "4"}, "avg_weight_bits"),
        ({"size_bytes": True}, "size_bytes"),
        ({"size_ratio": [0.1]}, "size_ratio"),
        ({"gbitops": float("nan")}, "gbitops"),
        ({"avg_weight_bits": math.inf}, "avg_weight_bits"),
        ({"avg_weight_bits": -1}, "avg_weight_bits"),
        ({"avg_weight_bits": 4, "max_act_bits": True}, "max_act_bits"),
        ({"avg_weight_bits": 4, "max_act_bits": 4.0}, "max_act_bits"),
        ({"avg_weight_bits": 4, "max_act_bits": "4"}, "max_act_bits"),
        ({"avg_weight_bits": 4, "max_act_bits": 9}, "max_act_bits"),
        ({"avg_weight_bits": 4, "size_ratio": 0.1}, "exactly one"),
        ({}, "exactly one"),
    ],
)
def test_budget_rejects_wrong_types_naming_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Budget(**kwargs)
    with pytest.raises(ValueError, match=match):
        Budget.from_dict(kwargs)


def test_budget_from_dict():
    assert Budget.from_dict({"avg_weight_bits": 4, "max_act_bits": 4}) == Budget(
        avg_weight_bits=4, max_act_bits=4
    )
    b = Budget(size_ratio=0.125)
    assert Budget.from_dict(b.to_dict()) == b
    with pytest.raises(ValueError, match=r"unknown budget key\(s\) \['avg_bits'\]"):
        Budget.from_dict({"avg_bits": 4})
    with pytest.raises(ValueError, match="mapping"):
        Budget.from_dict(4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": True}, "epochs"),
        ({"epochs": 2.0}, "epochs"),
        ({"epochs": 2, "freeze_epochs": 3}, "freeze_epochs"),
        ({"freeze_epochs": -1}, "freeze_epochs"),
        ({"lr": "0.1"}, r"TrainConfig\.lr "),
        ({"lr": -0.1}, r"TrainConfig\.lr "),
        ({"lr": float("nan")}, r"TrainConfig\.lr "),
        ({"weight_decay": None}, "weight_decay"),
        ({"lr_levels": True}, "lr_levels"),
        ({"lr_gates": -1}, "lr_gates"),
        ({"dual_step": "big"}, "dual_step"),
        ({"momentum": 1.5}, "momentum"),
        ({"anneal": 2}, "anneal"),
        ({"track_slack": -0.1}, "track_slack"),
        ({"calib_batches": 0}, "calib_batches"),
        ({"fit_batches": 1.5}, "fit_batches"),
        ({"max_steps_per_epoch": 0}, "max_steps_per_epoch"),
        ({"seed": "0"}, "seed"),
        ({"progress": "no"}, "progress"),
    ],
)
def test_train_config_rejects_wrong_values_naming_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_train_config_accepts_ints_for_rates_and_the_defaults():
    TrainConfig()
    TrainConfig(lr=1, weight_decay=0, track_slack=0.01, max_steps_per_epoch=3, anneal=0)


def test_cli_reports_a_bad_setting_in_a_config_file_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": "small_cnn", "ddq": {"skip": "fc"}}))
    assert main(["quantize", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddq quantize: error:") and "skip" in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    cfg.write_text(json.dumps({"model": "small_cnn", "budget": {"avg_bits": 4}}))
    assert main(["quantize", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "avg_bits" in capsys.readouterr().err
    cfg.write_text(json.dumps({"model": "small_cnn", "train": {"progress": "no"}}))
    assert main(["quantize", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "TrainConfig.progress" in capsys.readouterr().err


# -- 3. nothing to quantize ------------------------------------------------------------


@pytest.mark.parametrize(
    "net, cfg, match",
    [
        (lambda: nn.Sequential(nn.Flatten(), nn.ReLU()), None, "has no Conv1d/Conv2d/Linear"),
        (
            lambda: nn.Sequential(nn.ConvTranspose2d(1, 2, 3)),
            None,
            r"unsupported types \(\['ConvTranspose2d'\]\)",
        ),
        (_tiny_net, DDQConfig(skip=["0", "3"]), r"left float by the config: 0 \(skipped"),
        (_tiny_net, DDQConfig(first_last_bits="float"), "first/last convention"),
        (
            _tiny_net,
            DDQConfig(by_type={"Conv2d": {"weight": None}, "Linear": {"weight": None}}),
            "weight override None",
        ),
    ],
)
def test_prepare_without_any_quantizable_layer_says_so(net, cfg, match):
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="prepare found no layer to quantize") as e:
        ddq.prepare(model, cfg, example_inputs=torch.zeros(1, 1, 8, 8))
    assert __import__("re").search(match, str(e.value)), str(e.value)
    # The model is left as it was: not marked prepared, nothing replaced.
    assert not hasattr(model, "ddq_state")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- 4. the library logs, the CLI prints ---------------------------------------------


def test_train_ddq_logs_instead_of_printing(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="ddq"):
        _train()
    assert capsys.readouterr().out == ""
    epoch_lines = [r for r in caplog.records if r.getMessage().startswith("epoch 1/1: loss")]
    assert len(epoch_lines) == 1 and epoch_lines[0].name == "ddq.training.loop"
    assert epoch_lines[0].levelno == logging.INFO


def test_no_print_calls_in_the_library():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("cli/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                found.append(f"{rel}:{node.lineno}")
    assert not found, found


def test_summary_table_and_export_size_line_are_logged_on_request(tmp_path, capsys, caplog):
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    example = torch.zeros(1, 1, 8, 8)
    ddq.prepare(net, DDQConfig(first_last_bits="learn"), example_inputs=example)
    ddq.calibrate(net, [torch.randn(4, 1, 8, 8)])
    with caplog.at_level(logging.INFO, logger="ddq"):
        rows = ddq.summary(net, print_table=True)
        info = ddq.export(net, tmp_path / "m.ddq.safetensors", verbose=True)
    assert capsys.readouterr().out == ""
    messages = [r.getMessage() for r in caplog.records]
    assert any(rows.table() in m and "conventions:" in m for m in messages)
    assert str(info) in messages


def test_cli_shows_the_per_epoch_lines_and_leaves_logging_as_it_was(tmp_path, capsys):
    logger = logging.getLogger("ddq")
    before = (list(logger.handlers), logger.level, logger.propagate)
    args = ["quantize", "--model", "small_cnn", "--subset", "64", "--fp-epochs", "0",
            "--epochs", "1", "--freeze-epochs", "0", "--max-steps-per-epoch", "1",
            "--first-last", "learn", "--avg-bits", "6", "--no-progress",
            "--out", str(tmp_path / "r")]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("fp32 accuracy: ")
    assert out.count("epoch 1/1: loss ") == 1 and "report:" in out
    assert (list(logger.handlers), logger.level, logger.propagate) == before


# -- 5. devices ------------------------------------------------------------------------


def _device_error(tmp_path, capsys, device: str) -> str:
    args = ["quantize", "--model", "small_cnn", "--subset", "64", "--fp-epochs", "0",
            "--epochs", "1", "--device", device, "--out", str(tmp_path / "r")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddq quantize: error:") and err.strip().count("\n") == 0, err
    assert not (tmp_path / "r").exists()
    return err


def test_unknown_device_is_a_one_line_error(tmp_path, capsys):
    assert "'foo'" in _device_error(tmp_path, capsys, "foo")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_is_a_one_line_error(tmp_path, capsys):
    err = _device_error(tmp_path, capsys, "cuda")
    assert "'cuda'" in err and "not available" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_missing_cuda_index_is_a_one_line_error(tmp_path, capsys):
    err = _device_error(tmp_path, capsys, f"cuda:{torch.cuda.device_count()}")
    assert "not available" in err


def test_check_device():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        check_device(3)
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        check_device("gpu0")
