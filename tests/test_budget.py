"""Cost models against hand counts; Budget validation; the constraint; the fit guarantee."""

import re

import pytest
import torch
import torchvision
from torch import nn

import ddq
from ddq.budget import (
    Budget,
    BudgetConstraint,
    BudgetTracker,
    CostModel,
    fit_to_budget,
    learnable_quantizers,
)


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),          # 28x28
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.ReLU(),          # 14x14 dw
        nn.Conv2d(8, 16, 1), nn.ReLU(),                                        # 14x14 pw
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


def test_cost_model_equals_hand_count_on_small_cnn():
    model = ddq.prepare(
        small_cnn(),
        ddq.DDQConfig(first_last_bits="learn"),
        example_inputs=torch.zeros(1, 1, 28, 28),
    )
    macs = [28 * 28 * 8 * 9, 14 * 14 * 8 * 9, 14 * 14 * 16 * 8, 16 * 10]
    weights = [8 * 9, 8 * 9, 16 * 8, 16 * 10]
    biases_and_bn = 8 + 8 + 16 + 10 + 2 * 8  # conv/linear biases + BN affine
    cm = CostModel(model)
    assert cm.fp32_bytes() == (sum(weights) + biases_and_bn) * 4
    scales = 8 + 8 + 16 + 10  # one float per output channel of each per-channel weight
    assert cm.size_bytes() == (sum(weights) * 8 + (biases_and_bn + scales) * 32) / 8
    assert cm.gbitops() == pytest.approx(sum(macs) * 64 / 1e9)
    mods = dict(model.named_modules())
    mods["3"].weight_quantizer.set_bits(3)
    mods["5"].input_quantizer.set_bits(2)
    bits_w, bits_a = [8, 3, 8, 8], [8, 8, 2, 8]
    assert (
        cm.size_bytes()
        == (
            sum(n * b for n, b in zip(weights, bits_w, strict=True)) + (biases_and_bn + scales) * 32
        )
        / 8
    )
    assert cm.avg_weight_bits() == pytest.approx(
        sum(n * b for n, b in zip(weights, bits_w, strict=True)) / sum(weights)
    )
    expected = sum(m * w * a for m, w, a in zip(macs, bits_w, bits_a, strict=True))
    assert cm.gbitops() == pytest.approx(expected / 1e9)


def test_cost_model_on_resnet18_at_224():
    model = torchvision.models.resnet18()
    n_params = sum(p.numel() for p in model.parameters())
    ddq.prepare(model, example_inputs=torch.zeros(1, 3, 224, 224))
    cm = CostModel(model)
    assert n_params == 11_689_512  # torchvision's published count
    assert cm.fp32_bytes() == n_params * 4
    assert sum(lc.macs for lc in cm.layers) == 1_814_073_344  # 1.814 GMACs, the usual figure
    assert cm.gbitops() == pytest.approx(1_814_073_344 * 64 / 1e9)
    conv_fc_weights = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)
    )
    channels = sum(
        m.weight.shape[0] for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)
    )
    assert (
        cm.size_bytes() == (conv_fc_weights * 8 + (n_params - conv_fc_weights + channels) * 32) / 8
    )


def test_costs_are_differentiable_in_the_gates():
    model = ddq.prepare(small_cnn(), ddq.DDQConfig(first_last_bits="learn"),
                        example_inputs=torch.zeros(1, 1, 28, 28))  # fmt: skip
    cm = CostModel(model)
    (cm.size_bits() + cm.bitops()).backward()
    for name, q in learnable_quantizers(model).items():
        assert q.gate_logits.grad is not None and q.gate_logits.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"avg_weight_bits": 4, "gbitops": 1}, "exactly one"),
        ({"avg_weight_bits": -1}, "positive"),
        ({"avg_weight_bits": 4, "max_act_bits": 9}, "max_act_bits"),
    ],
)
def test_budget_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Budget(**kwargs)


@pytest.mark.parametrize(
    "budget", [Budget(avg_weight_bits=1.5), Budget(size_ratio=0.01), Budget(gbitops=1e-6)]
)
def test_infeasible_budget_names_the_smallest_feasible_value(budget):
    model = ddq.prepare(small_cnn(), example_inputs=torch.zeros(1, 1, 28, 28))
    cm = CostModel(model)
    with pytest.raises(ValueError, match="smallest feasible") as err:
        budget.apply(model, cm)
    smallest = float(re.search(rf"{budget.kind}=([0-9.e+-]+)", str(err.value)).group(1))
    # that value is feasible, and a little less is not
    feasible = Budget(**{budget.kind: smallest * 1.0001})
    feasible.apply(model, cm)
    with pytest.raises(ValueError):
        Budget(**{budget.kind: smallest * 0.999}).apply(model, cm)


def test_activation_cap_is_applied_to_learnable_quantizers_only():
    model = ddq.prepare(small_cnn(), example_inputs=torch.zeros(1, 1, 28, 28))
    Budget(avg_weight_bits=6, max_act_bits=4).apply(model, CostModel(model))
    mods = dict(model.named_modules())
    assert mods["3"].input_quantizer.bits == 4 and mods["5"].input_quantizer.bits == 4
    assert mods["0"].input_quantizer.bits == 8  # first layer: 8-bit convention


def test_constraint_multiplier_rises_over_budget_and_falls_under():
    model = ddq.prepare(small_cnn(), ddq.DDQConfig(first_last_bits="learn"),
                        example_inputs=torch.zeros(1, 1, 28, 28))  # fmt: skip
    cm = CostModel(model)
    c = BudgetConstraint(Budget(avg_weight_bits=4), cm, step=0.1)
    for _ in range(3):
        assert c.update() > 0
    high = c.lam
    assert high == pytest.approx(0.3)
    for q in learnable_quantizers(model).values():
        q.set_bits(2, trainable=True)
    c.update()
    assert c.lam < high


def _weights_only_model_and_grads():
    """small_cnn with learnable weight bits only; gradients saying closing bits of layer
    "5" (pointwise) hurts a lot and closing those of the others not at all."""
    model = ddq.prepare(small_cnn(), ddq.DDQConfig(first_last_bits="learn", activation=None),
                        example_inputs=torch.zeros(1, 1, 28, 28))  # fmt: skip
    qs = learnable_quantizers(model)
    grads = {n: torch.full((8,), -1.0 if n.startswith("5.") else 0.0) for n in qs}
    return model, CostModel(model), qs, grads


def test_fit_closes_the_cheapest_bits_first_and_meets_the_budget():
    model, cm, _, grads = _weights_only_model_and_grads()
    budget = Budget(avg_weight_bits=7.0)
    actions = fit_to_budget(model, budget, cm, grads, fill=False, close_by="gradient")
    assert budget.usage(cm) <= 1.0
    assert actions and all(not a.quantizer.startswith("5.") for a in actions)
    assert dict(model.named_modules())["5"].weight_quantizer.bits == 8


def test_fit_by_logit_closes_the_bits_training_pushed_down_first():
    model, cm, qs, grads = _weights_only_model_and_grads()
    # The gradient says layer "5" is the one to keep, but training pushed its last open
    # gate nearly shut: the logit ranking follows training, the gradient ranking does not.
    with torch.no_grad():
        qs["5.weight_quantizer"].gate_logits[7] = 0.01
    budget = Budget(avg_weight_bits=7.9)
    by_logit = fit_to_budget(model, budget, cm, grads, fill=False)
    assert by_logit[0].quantizer == "5.weight_quantizer" and by_logit[0].to_bits == 7
    with pytest.raises(ValueError, match="close_by"):
        fit_to_budget(model, budget, cm, grads, close_by="random")


def test_fit_fills_slack_with_the_most_useful_bits():
    model = ddq.prepare(small_cnn(), ddq.DDQConfig(first_last_bits="learn", activation=None),
                        example_inputs=torch.zeros(1, 1, 28, 28))  # fmt: skip
    cm = CostModel(model)
    qs = learnable_quantizers(model)
    for q in qs.values():
        q.set_bits(2, trainable=True)
    grads = {n: torch.full((8,), -1.0 if n.startswith("5.") else -1e-3) for n in qs}
    budget = Budget(avg_weight_bits=4.0)
    actions = fit_to_budget(model, budget, cm, grads)
    assert budget.usage(cm) <= 1.0
    assert actions[0].quantizer.startswith("5.") and actions[0].to_bits == 3
    # no single remaining bit fits in what is left
    left = budget.target(cm) - float(budget.measure(cm).detach())
    assert all(budget.unit_cost(cm, n, q) > left for n, q in qs.items() if q.bits < 8)


def test_fit_spends_the_budget_even_where_the_gradient_sees_no_gain():
    """The first-order gain of reopening a bit is noisy (here it says every bit would hurt);
    the fill still reopens the highest-logit bits until no closed bit fits in the slack."""
    model, cm, qs, _ = _weights_only_model_and_grads()
    for q in qs.values():
        q.set_bits(2, trainable=True)
    with torch.no_grad():  # training pushed layer "3"'s third bit nearest to reopening
        qs["3.weight_quantizer"].gate_logits[2] = -0.01  # the others: -0.25
    grads = {n: torch.full((8,), 1.0) for n in qs}  # opening any bit "increases the loss"
    budget = Budget(avg_weight_bits=5.0)
    actions = fit_to_budget(model, budget, cm, grads)
    assert actions[0].quantizer == "3.weight_quantizer" and actions[0].to_bits == 3
    assert 0.97 <= budget.usage(cm) <= 1.0
    left = budget.target(cm) - float(budget.measure(cm).detach())
    assert all(budget.unit_cost(cm, n, q) > left for n, q in qs.items() if q.bits < 8)


def test_annealed_target_moves_from_the_initial_cost_to_the_budget():
    model = ddq.prepare(small_cnn(), ddq.DDQConfig(first_last_bits="learn"),
                        example_inputs=torch.zeros(1, 1, 28, 28))  # fmt: skip
    cm = CostModel(model)
    budget = Budget(avg_weight_bits=4)
    c = BudgetConstraint(budget, cm)
    c.set_progress(0.0)
    assert c.target == pytest.approx(8.0) and float(c.excess().detach()) == pytest.approx(0.0)
    c.set_progress(0.5)
    assert c.target == pytest.approx(6.0)
    c.set_progress(3.0)
    assert c.target == pytest.approx(4.0) and float(c.excess().detach()) == pytest.approx(1.0)


def _tracked_model():
    model = ddq.prepare(small_cnn(), ddq.DDQConfig(first_last_bits="learn", activation=None),
                        example_inputs=torch.zeros(1, 1, 28, 28))  # fmt: skip
    return model, CostModel(model)


def test_tracker_averages_the_gate_gradients():
    model, cm = _tracked_model()
    tracker = BudgetTracker(model, Budget(avg_weight_bits=4), cm, beta=0.5)
    qs = learnable_quantizers(model)
    for value in (1.0, 3.0):
        for q in qs.values():
            q.gate_logits.grad = torch.full_like(q.gate_logits, value)
        tracker.observe()
    for name in qs:  # first observation taken as is, then 0.5 * 1 + 0.5 * 3
        assert torch.allclose(tracker.ema[name], torch.full((8,), 2.0)), name


def test_tracker_follows_the_target_closing_the_least_useful_bits():
    model, cm = _tracked_model()
    budget = Budget(avg_weight_bits=4)
    tracker = BudgetTracker(model, budget, cm, slack=0.05)
    qs = learnable_quantizers(model)
    # Bits of layer "5" (pointwise) are costly to lose; the others are free to lose.
    tracker.ema = {n: torch.full((8,), -1.0 if n.startswith("5.") else 0.0) for n in qs}
    assert tracker.enforce(8.0 * 1.04) == []  # within the slack: nothing moves
    total = 0
    for target in (7.5, 7.0, 6.5, 6.0):
        actions = tracker.enforce(target)
        total += len(actions)
        assert float(budget.measure(cm).detach()) <= target + 1e-9
        assert all(a.to_bits == a.from_bits - 1 for a in actions)
    assert tracker.moves == total > 0
    assert dict(model.named_modules())["5"].weight_quantizer.bits == 8
    # the closed bits stay trainable: the task gradient may reopen them later
    assert all(int(q.floor) < int(q.ceiling) for q in qs.values())
    restored = BudgetTracker(model, budget, cm)
    restored.load_state_dict(tracker.state_dict())
    assert restored.moves == tracker.moves and restored.ema.keys() == tracker.ema.keys()


@pytest.mark.parametrize("kwargs", [{"slack": -0.1}, {"beta": 1.0}])
def test_tracker_rejects_bad_settings(kwargs):
    model, cm = _tracked_model()
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        BudgetTracker(model, Budget(avg_weight_bits=4), cm, **kwargs)


def test_train_ddq_with_tracking_reaches_the_budget_before_the_fit():
    from ddq.data import create_dataset, make_loaders
    from ddq.training import TrainConfig, train_ddq

    torch.manual_seed(0)
    train_loader, test_loader = make_loaders(create_dataset("mnist5k", subset=128), 32)
    model = ddq.prepare(small_cnn(), ddq.DDQConfig(first_last_bits="learn"),
                        example_inputs=torch.zeros(1, 1, 28, 28))  # fmt: skip
    cfg = TrainConfig(epochs=2, track_slack=0.01, calib_batches=1, fit_batches=1,
                      progress=False)  # fmt: skip
    result = train_ddq(model, train_loader, test_loader, Budget(avg_weight_bits=4), cfg)
    learning = [r for r in result.history if not r["bits_frozen"]]
    # The annealed target reached the budget half-way through the learning epoch; the
    # tracker closed bits so the cost never ran more than 1% ahead of it.
    assert learning and learning[-1]["budget_usage"] <= 1.01
    assert sum(r["bits_tracked"] for r in learning) == result.extra["bits_tracked"] > 0
    assert result.budget_usage <= 1.0
