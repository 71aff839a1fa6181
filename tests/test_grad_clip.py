"""``TrainConfig.grad_clip``: the global gradient norm the optimizer step sees is at most
the clip (checked against a norm computed here); ``None`` changes nothing, bitwise;
old checkpoints without the setting still resume. And the accuracy benchmark's
``--grad-clip``/``--freeze-bn``: in the cache key, applied to the fixed-bit peers."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_helpers import prepared_small_cnn
from torch import nn

from ddq import Budget, DDQTrainer, TrainConfig
from ddq.data import create_dataset, make_loaders
from ddq.models import create_model
from ddq.training import DDQOptimizer, evaluate, load_checkpoint, save_checkpoint, train_ddq

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
BUDGET = dict(avg_weight_bits=4, max_act_bits=4)


def _loaders():
    return make_loaders(create_dataset("mnist5k", subset=128), batch_size=32)


def _config(**kw) -> TrainConfig:
    base = dict(epochs=2, freeze_epochs=1, max_steps_per_epoch=3, calib_batches=2,
                fit_batches=2, progress=False)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _global_norm(model: nn.Module) -> float:
    """The oracle: the L2 norm of every gradient of the model, computed independently."""
    total = sum(
        float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None
    )
    return math.sqrt(total)


def _record_step_norms(monkeypatch, model: nn.Module) -> list[float]:
    """The global gradient norm at every ``DDQOptimizer.step`` (what ``train_ddq`` steps)."""
    norms: list[float] = []
    step = DDQOptimizer.step

    def recording_step(self) -> None:
        norms.append(_global_norm(model))
        step(self)

    monkeypatch.setattr(DDQOptimizer, "step", recording_step)
    return norms


def test_the_optimizer_step_sees_at_most_the_clip(monkeypatch):
    train, test = _loaders()
    model = prepared_small_cnn()
    unclipped = _record_step_norms(monkeypatch, model)
    train_ddq(model, train, test, Budget(**BUDGET), _config())
    clip = 0.5 * min(unclipped)  # below every step's own norm: clipping acts at every step
    model = prepared_small_cnn()
    norms = _record_step_norms(monkeypatch, model)
    train_ddq(model, train, test, Budget(**BUDGET), _config(grad_clip=clip))
    assert len(norms) == 6
    assert all(n <= clip * (1 + 1e-4) for n in norms), (clip, norms)
    assert all(n >= clip * (1 - 1e-3) for n in norms), (clip, norms)  # scaled, not zeroed


def test_clip_gradients_scales_every_trained_parameter_together():
    train, _ = _loaders()
    model = prepared_small_cnn()
    trainer = DDQTrainer(model, Budget(**BUDGET), _config(grad_clip=0.01), steps_per_epoch=3)
    trainer.calibrate(train)
    x, y = next(iter(train))
    trainer.loss(F.cross_entropy(model(x), y)).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any("gate_logits" in n for n in before) and any("weight" in n for n in before)
    norm = trainer.clip_gradients()
    assert float(norm) == pytest.approx(_global_norm_of(before.values()), rel=1e-5)
    scale = 0.01 / (float(norm) + 1e-6)
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p.grad, before[n] * scale, rtol=1e-5, atol=1e-12)
    trainer.config = _config()  # grad_clip None: a no-op, gradients untouched
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert trainer.clip_gradients() is None
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if n in grads)


def _global_norm_of(grads) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def _loop_without_clipping(model: nn.Module, loader, cfg: TrainConfig) -> None:
    """``train_ddq``'s steps as they were before ``grad_clip`` existed (no clipping call)."""
    steps = cfg.max_steps_per_epoch
    trainer = DDQTrainer(model, Budget(**BUDGET), cfg, steps_per_epoch=steps)
    torch.manual_seed(cfg.seed)
    trainer.calibrate(loader)
    opt = trainer.optimizer()

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    for epoch in range(cfg.epochs):
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)
        loader.generator.manual_seed(cfg.seed * 1_000_003 + epoch)
        if trainer.should_finalize:
            trainer.finalize(loader, loss_fn, cfg.fit_batches)
        model.train()
        for i, batch in enumerate(loader):
            if i >= steps:
                break
            loss = trainer.loss(loss_fn(model, batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
            trainer.step()


@pytest.mark.parametrize("grad_clip", [None, 1e12])
def test_no_clip_changes_nothing_bitwise(grad_clip):
    """``None`` is the old behaviour exactly; a clip far above every norm scales by 1.0."""
    train, test = _loaders()
    a, b = prepared_small_cnn(), prepared_small_cnn()
    result = train_ddq(a, train, test, Budget(**BUDGET), _config(grad_clip=grad_clip))
    own_train, own_test = _loaders()  # the loaders' generators start alike
    _loop_without_clipping(b, own_train, _config())
    # train_ddq ends with an evaluation, whose first forward re-fits moved levels.
    assert evaluate(b, own_test) == result.test_acc
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [
        k for k in sa if not torch.equal(sa[k], sb[k])
    ]


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, True, "1"])
def test_grad_clip_is_validated(bad):
    with pytest.raises(ValueError, match=r"TrainConfig\.grad_clip must be a finite number > 0"):
        TrainConfig(grad_clip=bad)


def test_checkpoint_without_grad_clip_resumes(tmp_path):
    """A run folder written before ``grad_clip`` existed resumes as ``grad_clip=None``, and
    refuses a resume that would turn clipping on."""
    train, test = _loaders()
    cfg = _config(epochs=1, freeze_epochs=0)
    train_ddq(prepared_small_cnn(), train, test, Budget(**BUDGET), cfg, run_dir=tmp_path)
    ckpt = tmp_path / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    assert state["train_config"]["grad_clip"] is None
    del state["train_config"]["grad_clip"]  # as an older version wrote it
    save_checkpoint(ckpt, state)
    more = _config(epochs=2, freeze_epochs=0)
    with pytest.raises(ValueError, match="different training settings: \\['epochs'\\]"):
        train_ddq(
            prepared_small_cnn(), train, test, Budget(**BUDGET), more, run_dir=tmp_path, resume=True
        )
    res = train_ddq(
        prepared_small_cnn(), train, test, Budget(**BUDGET), cfg, run_dir=tmp_path, resume=True
    )
    assert len(res.history) == 1
    clipped = _config(epochs=1, freeze_epochs=0, grad_clip=1.0)
    with pytest.raises(ValueError, match="different training settings: \\['grad_clip'\\]"):
        train_ddq(
            prepared_small_cnn(),
            train,
            test,
            Budget(**BUDGET),
            clipped,
            run_dir=tmp_path,
            resume=True,
        )


# -- the accuracy benchmark ---------------------------------------------------------------
def _bench():
    name = "bench_accuracy"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def test_bench_cache_key_has_grad_clip_and_freeze_bn():
    mod = _bench()
    base = mod.parse_args(["--code", "0.1.0+aaaaaaaaaaaa"])
    key = mod._base_key("mobilenet_v2", 0, mod.settings_of(base))
    for extra in (
        ["--grad-clip", "2.5"],
        ["--grad-clip", "none"],
        ["--freeze-bn"],
        ["--no-freeze-bn"],
    ):
        other = mod.parse_args(["--code", "0.1.0+aaaaaaaaaaaa", *extra])
        if vars(other) != vars(base):
            assert mod._base_key("mobilenet_v2", 0, mod.settings_of(other)) != key, extra
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            mod.parse_args(["--grad-clip", bad])


def test_bench_train_fixed_clips_every_parameter(monkeypatch):
    mod = _bench()
    train, _ = _loaders()
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1, small_input=True)
    norms: list[float] = []
    step = torch.optim.SGD.step

    def recording_step(self, *a, **k):
        norms.append(_global_norm(model))
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    mod.train_fixed(model, train, 1, 0.01, 5e-5, 0, 3, grad_clip=1e-3)
    assert len(norms) == 3 and all(n <= 1e-3 * (1 + 1e-4) for n in norms), norms


def test_bench_freeze_batchnorm_uses_running_statistics_in_training_steps():
    mod = _bench()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    x = torch.randn(8, 1, 6, 6) * 3 + 1
    assert mod.freeze_batchnorm(model) == 1
    bn = model[1]
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    model.train()
    out = model(x)  # a training step: running statistics, no update
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert bn.training
    torch.testing.assert_close(out, model.eval()(x).detach())
    model.train()
    with torch.no_grad():  # calibration / BatchNorm re-estimation: batch statistics
        model(x)
    assert not torch.equal(bn.running_mean, mean)
