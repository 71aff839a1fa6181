"""The DDQ lifecycle (``DDQTrainer``) in a loop you write: the same seed gives the same
bits and weights as ``train_ddq``; any loss (here a regression) works; it resumes; the
README's example runs."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_helpers import prepared_small_cnn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ddq
from ddq import Budget, DDQConfig, DDQTrainer, TrainConfig
from ddq.data import create_dataset, make_loaders
from ddq.layers import quantizers_of
from ddq.training import DDQOptimizer, evaluate, split_parameters, train_ddq

README = Path(__file__).resolve().parents[1] / "README.md"
BUDGET = dict(avg_weight_bits=4, max_act_bits=4)


def _mnist() -> tuple[DataLoader, DataLoader]:
    return make_loaders(create_dataset("mnist5k", subset=256), batch_size=32)


def _config(**kw) -> TrainConfig:
    base = dict(epochs=2, freeze_epochs=1, max_steps_per_epoch=3, calib_batches=2,
                fit_batches=2, track_slack=0.01, progress=False)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _bits(model: nn.Module) -> dict[str, int]:
    return {n: q.bits for n, q in quantizers_of(model).items()}


def _hand_written_loop(model: nn.Module, loader: DataLoader, cfg: TrainConfig) -> DDQTrainer:
    """What train_ddq does, written against the public lifecycle only."""
    steps = min(len(loader), cfg.max_steps_per_epoch)
    trainer = DDQTrainer(model, Budget(**BUDGET), cfg, steps_per_epoch=steps)
    torch.manual_seed(cfg.seed)
    trainer.calibrate(loader)
    opt = trainer.optimizer()

    def loss_fn(m, batch):
        x, y = batch
        return F.cross_entropy(m(x), y)

    for epoch in range(cfg.epochs):
        # train_ddq's per-epoch seeding, so a resumed run repeats the same epoch.
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)
        loader.generator.manual_seed(cfg.seed * 1_000_003 + epoch)
        if trainer.should_finalize:
            trainer.finalize(loader, loss_fn)
        model.train()
        for i, batch in enumerate(loader):
            if i >= steps:
                break
            loss = trainer.loss(loss_fn(model, batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
            trainer.step()
    trainer.finalize(loader, loss_fn)
    return trainer


@pytest.mark.parametrize("freeze_epochs", [1, 0])
def test_lifecycle_in_a_hand_written_loop_equals_train_ddq(freeze_epochs):
    cfg = _config(freeze_epochs=freeze_epochs)
    a, b = prepared_small_cnn(), prepared_small_cnn()
    train_loader, test_loader = _mnist()
    result = train_ddq(a, train_loader, test_loader, Budget(**BUDGET), cfg)
    own_train, own_test = _mnist()
    trainer = _hand_written_loop(b, own_train, cfg)
    # train_ddq ends with a test evaluation; the first forward after the fit re-fits the
    # levels of every quantizer whose bits moved, so the comparison needs it too.
    assert evaluate(b, own_test) == result.test_acc
    assert _bits(a) == _bits(b)
    assert [vars(x) for x in result.fit_actions] == [vars(x) for x in trainer.fit_actions]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert trainer.fitted and trainer.usage() <= 1 + 1e-9
    assert result.budget_usage == pytest.approx(trainer.usage())


def _regression_data(n: int = 128) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    return TensorDataset(x, torch.tanh(x @ w) + 0.05 * torch.randn(n, 1, generator=g))


def _regressor() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    return ddq.prepare(net, DDQConfig(first_last_bits="learn"), example_inputs=torch.zeros(1, 8))


def _mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def test_a_regression_loss_through_the_lifecycle_meets_the_budget():
    loader = DataLoader(_regression_data(), batch_size=16, shuffle=False)
    model = _regressor()
    cfg = TrainConfig(epochs=4, freeze_epochs=1, lr=0.05, calib_batches=2, fit_batches=2)
    trainer = DDQTrainer(model, Budget(avg_weight_bits=3), cfg, steps_per_epoch=len(loader))
    assert trainer.fit_step == 3 * len(loader) and trainer.total_steps == 4 * len(loader)
    assert trainer.calibrate(loader) > 0
    opt = trainer.optimizer()
    first = None
    for _ in range(cfg.epochs):
        if trainer.should_finalize:
            trainer.finalize(loader, _mse)
        for batch in loader:
            task = _mse(model, batch)
            first = task.item() if first is None else first
            loss = task + trainer.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            trainer.step()
    assert trainer.fitted and trainer.steps == 4 * len(loader)
    assert trainer.usage() <= 1 + 1e-9
    assert all(int(q.floor) == int(q.ceiling) == q.bits for q in quantizers_of(model).values())
    assert float(trainer.penalty()) == 0.0
    with torch.no_grad():
        last = sum(_mse(model, b).item() for b in loader) / len(loader)
    assert last < first
    assert trainer.finalize(loader, _mse) is trainer.fit_actions  # a second call: no-op


def test_train_ddq_takes_a_loss_a_metric_and_any_batch_structure():
    data = _regression_data()
    dicts = [{"features": data.tensors[0][i : i + 16], "value": data.tensors[1][i : i + 16]}
             for i in range(0, len(data), 16)]  # fmt: skip
    model = _regressor()
    cfg = TrainConfig(epochs=2, freeze_epochs=1, calib_batches=1, fit_batches=1, progress=False)
    result = train_ddq(
        model, dicts, dicts, Budget(avg_weight_bits=3), cfg,
        loss_fn=F.mse_loss,
        metric_fn=lambda out, y: -((out - y) ** 2).mean(1),
        batch_to_inputs_targets=lambda b: ((b["features"],), b["value"]),
    )  # fmt: skip
    assert result.budget_usage <= 1 + 1e-9 and len(result.history) == 2
    assert result.test_acc <= 0 and result.history[-1]["train_acc"] <= 0
    assert result.history[-1]["bits_frozen"] == 1


def test_trainer_state_dict_resumes_to_the_same_result():
    loader = DataLoader(_regression_data(64), batch_size=16, shuffle=False)
    cfg = TrainConfig(epochs=2, freeze_epochs=1, track_slack=0.01, calib_batches=1)

    def run(stop_after: int | None):
        model = _regressor()
        trainer = DDQTrainer(model, Budget(avg_weight_bits=3), cfg, steps_per_epoch=len(loader))
        trainer.calibrate(loader)
        opt = trainer.optimizer()
        for epoch in range(cfg.epochs):
            if stop_after == epoch:
                return model, trainer, opt
            if trainer.should_finalize:
                trainer.finalize(loader, _mse)
            for batch in loader:
                loss = trainer.loss(_mse(model, batch))
                opt.zero_grad()
                loss.backward()
                opt.step()
                trainer.step()
        return model, trainer, opt

    full, _, _ = run(None)
    half, half_trainer, half_opt = run(1)
    saved = {"model": half.state_dict(), "opt": half_opt.state_dict(),
             "ddq": half_trainer.state_dict()}  # fmt: skip
    model = _regressor()
    trainer = DDQTrainer(model, Budget(avg_weight_bits=3), cfg, steps_per_epoch=len(loader))
    model.load_state_dict(saved["model"])
    trainer.load_state_dict(saved["ddq"])
    opt = trainer.optimizer()
    opt.load_state_dict(saved["opt"])
    assert trainer.steps == len(loader) and trainer.lam == half_trainer.lam
    trainer.finalize(loader, _mse)
    for batch in loader:
        loss = trainer.loss(_mse(model, batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        trainer.step()
    assert _bits(model) == _bits(full)
    for k, v in full.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="budget"):
        DDQTrainer(_regressor(), Budget(avg_weight_bits=4), cfg, steps_per_epoch=4) \
            .load_state_dict(saved["ddq"])  # fmt: skip


def test_parameter_groups_and_the_suggested_optimizers():
    model = _regressor()
    weights, levels, gates = split_parameters(model)
    n = sum(1 for _ in model.parameters())
    assert len(weights) + len(levels) + len(gates) == n and gates and levels
    opt = DDQOptimizer(model, TrainConfig(lr=0.1, lr_levels=0.002, lr_gates=0.03), total_steps=10)
    assert isinstance(opt.weights, torch.optim.SGD) and isinstance(opt.quantizers, torch.optim.Adam)
    assert [g["lr"] for g in opt.quantizers.param_groups] == [0.002, 0.03]
    for _ in range(5):
        opt.step()
    assert opt.get_last_lr() == pytest.approx(0.05)  # half-way down the cosine
    assert opt.quantizers.param_groups[1]["lr"] == 0.03  # the gates' rate is constant


def test_bad_arguments_are_named():
    model = _regressor()
    with pytest.raises(ValueError, match="Budget"):
        DDQTrainer(model, {"avg_weight_bits": 4}, steps_per_epoch=1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        DDQTrainer(model, Budget(avg_weight_bits=4), steps_per_epoch=None)
    trainer = DDQTrainer(model, Budget(avg_weight_bits=4), steps_per_epoch=1)
    with pytest.raises(ValueError, match="loss_fn"):
        trainer.finalize([torch.zeros(1, 8)])


def test_the_readme_example_runs(capsys):
    text = README.read_text()
    section = text.split("## Your own training loop", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.fitted and trainer.usage() <= 1 + 1e-9
    assert "budget used" in capsys.readouterr().out


def test_gate_gradients_equal_a_plain_backward_and_leave_the_model_as_it_was():
    # finalize's gate gradients are taken with every other parameter's requires_grad off
    # (memory, time); the oracle is the plain backward with everything trainable.
    model = prepared_small_cnn()
    train, _ = _mnist()
    batches = [next(iter(train)) for _ in range(2)]
    trainer = DDQTrainer(model, Budget(**BUDGET), _config(), steps_per_epoch=1)
    trainer.calibrate(batches)

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    model.eval()
    for batch in batches:
        loss_fn(model, batch).backward()
    want = {n: q.gate_logits.grad.clone() for n, q in quantizers_of(model).items()}
    model.zero_grad(set_to_none=True)
    flags = [p.requires_grad for p in model.parameters()]
    model.train()
    got = trainer.gate_gradients(batches, loss_fn, num_batches=2)
    assert got.keys() == want.keys() and len(got) > 0
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-8, msg=name)
    assert any(g.abs().sum() > 0 for g in got.values())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert model.training
