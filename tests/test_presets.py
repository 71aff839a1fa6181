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
    assert cfg.weight.level_grid == PRESETS[name]["weight_level_grid"]
    assert cfg.activation.level_grid is None
    default = DDQConfig()
    # Everything but the modes (and the weights' level grid) is the default configuration.
    for part in ("weight", "activation"):
        a = getattr(cfg, part).__dict__ | {"mode": None, "level_grid": None}
        b = getattr(default, part).__dict__ | {"mode": None, "level_grid": None}
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
    assert cfg.ddq["weight"]["level_grid"] == 8
    assert cfg.ddq["integer_graph"] is True
    with pytest.raises(ValueError, match="--preset or --mode"):
        settings_from_args(_args("--preset", "int8", "--mode", "uniform"))


@pytest.mark.parametrize(
    "budget", [{"avg_weight_bits": 5.0}, {"gbitops": None}], ids=["avg_bits", "bitops"]
)
def test_int8_preset_trains_through_the_budget_fit(budget):
    """integer_graph's output quantizers (no MACs, no stored bits) go through the budget
    fit at zero cost, and leave the budget met."""
    import torch
    import torch.nn.functional as F

    import ddq
    from ddq.conversion.output_quantizers import output_quantizers
    from ddq.models import create_model

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1, small_input=True)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    ddq.prepare(model, preset("int8", first_last_bits="learn"), example_inputs=x[:1])
    assert output_quantizers(model)  # the preset added some
    if budget.get("gbitops", 0) is None:
        budget = {"gbitops": 0.6 * ddq.CostModel(model).gbitops()}
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    config = ddq.TrainConfig(epochs=1, freeze_epochs=0, fit_batches=1, progress=False)
    trainer = ddq.DDQTrainer(model, ddq.Budget(**budget), config, steps_per_epoch=2)
    trainer.calibrate([b[0] for b in batches])

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    opt = trainer.optimizer()
    for batch in batches:
        loss = trainer.loss(loss_fn(model, batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        trainer.step()
    trainer.finalize(batches, loss_fn)
    assert trainer.usage() <= 1.0 + 1e-6
