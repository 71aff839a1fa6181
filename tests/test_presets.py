"""Presets (ddq.conversion.presets) and the CLI's --preset: the level family each quantizer
gets, and that a run saves it."""

import argparse

import pytest

from ddq.cli.main import build_parser
from ddq.cli.quantize_cmd import settings_from_args
from ddq.conversion import DDQConfig
from ddq.conversion.presets import PRESETS, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_sets_the_modes_and_nothing_else(name):
    cfg = preset(name)
    assert cfg.weight.mode == PRESETS[name]["weight"]
    assert cfg.activation.mode == PRESETS[name]["activation"]
    default = DDQConfig()
    # Everything but the modes is the default configuration.
    for part in ("weight", "activation"):
        a = getattr(cfg, part).__dict__ | {"mode": None}
        b = getattr(default, part).__dict__ | {"mode": None}
        assert a == b
    assert cfg.integer_graph is PRESETS[name]["integer_graph"]
    ignore = {"weight": None, "activation": None, "integer_graph": None}
    assert cfg.to_dict() | ignore == default.to_dict() | ignore


def test_adaptive_is_the_default_config():
    assert preset("adaptive").to_dict() == DDQConfig().to_dict()


def test_changes_and_errors():
    assert preset("int8", first_last_bits="learn").first_last_bits == "learn"
    assert preset("int8", activation=None).activation is None
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        preset("fast")


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["quantize", *argv])


def test_cli_preset_reaches_the_run_config():
    cfg = settings_from_args(_args("--preset", "int8"))
    assert cfg.ddq["weight"]["mode"] == "adaptive"
    assert cfg.ddq["activation"]["mode"] == "uniform"
    assert cfg.ddq["integer_graph"] is True
    with pytest.raises(ValueError, match="--preset or --mode"):
        settings_from_args(_args("--preset", "int8", "--mode", "uniform"))
