"""The DDQ training loop: task loss + budget constraint, then a guaranteed fit, then
fine-tuning at the final bits. Usable from Python and from the ``ddq`` CLI; runs under
``torchrun`` (PyTorch DDP) unchanged."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..budget import (
    Budget,
    BudgetConstraint,
    BudgetTracker,
    CostModel,
    FitAction,
    fit_to_budget,
)
from ..layers import quantizers_of
from .calibrate import calibrate
from .checkpoint import load_checkpoint, save_checkpoint
from .optim import split_parameters
from .progress import MetricsLog, progress

__all__ = ["TrainConfig", "TrainResult", "evaluate", "train_ddq", "train_float"]

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of the DDQ training loop.

    Args:
        epochs: total DDQ epochs, including ``freeze_epochs``.
        lr, momentum, weight_decay: SGD on the model's weights (cosine schedule).
        lr_levels: Adam on the quantizers' level parameters (cosine schedule). Adam moves
            every parameter by about this much per step however weak its gradient, so it
            is small: at 0.001 the levels move at the weights' pace and stay near their
            data-driven fit; at 0.01 they random-walk away from it (BENCHMARKS.md, level
            learning).
        lr_gates: Adam on the gate logits (constant).
        dual_step: step of the Lagrange multiplier's dual ascent.
        anneal: fraction of the learning phase (before the fit) over which the effective
            target moves from the initial cost to the budget.
        track_slack: opt-in: while learning, close bits as soon as the cost exceeds the
            effective target by this fraction (``BudgetTracker``). ``None`` (default)
            leaves the learning phase to the multiplier and the final fit: on the MNIST
            benchmark tracking cost 1.8 pt at a 4-bit size and gained 1.0 pt at 3 bits
            (one seed each), see BENCHMARKS.md.
        freeze_epochs: final epochs trained at fixed bits, after the budget fit.
        calib_batches: batches used to calibrate activation ranges.
        calib_method: ``"percentile"`` (default) or ``"mse"``, see ``ddq.calibrate``.
        fit_batches: batches whose gate gradients rank bits in the budget fit.
        max_steps_per_epoch: cap on steps per epoch (quick runs and tests).
        seed: seeds data order, dropout and initialisation per epoch (resumable).
        progress: show progress bars.
    """

    epochs: int = 6
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-5
    lr_levels: float = 0.001
    lr_gates: float = 0.01
    dual_step: float = 0.05
    anneal: float = 0.5
    track_slack: float | None = None
    freeze_epochs: int = 1
    calib_batches: int = 8
    calib_method: str = "percentile"
    fit_batches: int = 8
    max_steps_per_epoch: int | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""

        def integer(key: str, low: int, optional: bool = False) -> None:
            v = getattr(self, key)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                what = f"an integer >= {low}" + (" or null" if optional else "")
                raise ValueError(f"TrainConfig.{key} must be {what}, got {v!r}")

        def number(key: str, low: float, high: float = math.inf, optional: bool = False) -> None:
            v = getattr(self, key)
            if optional and v is None:
                return
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not math.isfinite(v)
                or not low <= v <= high
            ):
                span = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
                what = f"a finite number {span}" + (" or null" if optional else "")
                raise ValueError(f"TrainConfig.{key} must be {what}, got {v!r}")

        integer("epochs", 1)
        integer("freeze_epochs", 0)
        if self.freeze_epochs > self.epochs:
            raise ValueError(
                f"TrainConfig.freeze_epochs must be in 0..epochs ({self.epochs}), "
                f"got {self.freeze_epochs}"
            )
        for key in ("lr", "weight_decay", "lr_levels", "lr_gates", "dual_step"):
            number(key, 0.0)
        number("momentum", 0.0, 1.0)
        number("anneal", 0.0, 1.0)
        number("track_slack", 0.0, optional=True)
        integer("calib_batches", 1)
        if self.calib_method not in ("percentile", "mse"):
            raise ValueError(
                f"TrainConfig.calib_method must be 'percentile' or 'mse', got {self.calib_method!r}"
            )
        integer("fit_batches", 0)
        integer("max_steps_per_epoch", 1, optional=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"TrainConfig.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.progress, bool):
            raise ValueError(f"TrainConfig.progress must be true or false, got {self.progress!r}")


@dataclass
class TrainResult:
    """What ``train_ddq`` produced."""

    history: list[dict[str, Any]]
    fit_actions: list[FitAction]
    test_acc: float
    budget_usage: float
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make epoch ``epoch`` identical whether the run was resumed or not."""
    torch.manual_seed(seed * 1_000_003 + epoch)
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    gen = getattr(loader, "generator", None)
    if gen is not None:
        gen.manual_seed(seed * 1_000_003 + epoch)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy in percent (summed over processes under DDP).

    Example:
        >>> evaluate(model, test_loader)  # doctest: +SKIP
        98.7
    """
    was = model.training
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct[0] += (model(x).argmax(1) == y).sum()
        correct[1] += y.numel()
    if dist.is_initialized():
        dist.all_reduce(correct)
    model.train(was)
    return float(100 * correct[0] / correct[1].clamp(min=1))


def train_float(
    model: nn.Module,
    train_loader: DataLoader,
    test_loader: DataLoader,
    epochs: int,
    lr: float = 0.05,
    seed: int = 0,
    device: str | torch.device = "cpu",
    show_progress: bool = True,
) -> float:
    """Full-precision (pre-)training with SGD + cosine; returns test accuracy."""
    net = _wrap_ddp(model, device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = max(epochs * len(train_loader), 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for epoch in range(epochs):
        _seed_epoch(train_loader, seed + 7919, epoch)
        model.train()
        bar = progress(
            train_loader, show_progress and _is_main(), desc=f"fp32 {epoch + 1}/{epochs}"
        )
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return evaluate(model, test_loader, device)


def _wrap_ddp(model: nn.Module, device: str | torch.device) -> nn.Module:
    if not dist.is_initialized():
        return model
    dev = torch.device(device)
    ids = [dev.index] if dev.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _gate_gradients(
    model: nn.Module, net: nn.Module, loader: DataLoader, batches: int, device
) -> dict[str, torch.Tensor]:
    """Task-loss gradients of every quantizer's gate logits over a few batches."""
    qs = quantizers_of(model)
    model.zero_grad(set_to_none=True)
    was = model.training
    model.eval()  # no BatchNorm statistics update, no dropout
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            break
        F.cross_entropy(net(x.to(device)), y.to(device)).backward()
    model.train(was)
    grads = {
        n: q.gate_logits.grad.detach().clone()
        for n, q in qs.items()
        if q.gate_logits.grad is not None
    }
    model.zero_grad(set_to_none=True)
    return grads


def _freeze_bits(model: nn.Module) -> None:
    for q in quantizers_of(model).values():
        q.set_bits(q.bits, trainable=False)


def train_ddq(
    model: nn.Module,
    train_loader: DataLoader,
    test_loader: DataLoader,
    budget: Budget,
    config: TrainConfig | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train a prepared model to ``budget`` and guarantee it is met.

    Epochs ``1..epochs - freeze_epochs`` learn weights, levels and bits with the loss
    ``cross_entropy + lambda (cost / target - 1)`` (``lambda`` adapted by dual ascent). Then
    ``fit_to_budget`` closes the bits training pushed lowest (or reopens the most useful
    ones) until the model meets the budget, bits are frozen, and the last
    ``freeze_epochs`` fine-tune weights and levels at those bits. A checkpoint is written
    atomically after every epoch; ``resume=True`` continues from it and ends with the same
    result as an uninterrupted run.

    Example:
        >>> result = train_ddq(model, train_loader, test_loader,
        ...                    Budget(avg_weight_bits=4, max_act_bits=4),
        ...                    TrainConfig(epochs=4), run_dir="runs/demo")  # doctest: +SKIP
    """
    cfg = config or TrainConfig()
    run_path = Path(run_dir) if run_dir is not None else None
    ckpt_path = run_path / "checkpoint.pt" if run_path is not None else None
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(cfg).__name__}")
    if not isinstance(budget, Budget):
        raise ValueError(f"budget must be a Budget, got {type(budget).__name__}")
    model.to(device)
    cost_model = CostModel(model)
    budget.apply(model, cost_model)  # activation cap + feasibility, before any training

    start_epoch, fitted, actions, rows = 0, False, [], []
    state = None
    if resume:
        if ckpt_path is None or not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = load_checkpoint(ckpt_path)
        now = dataclasses.asdict(cfg)
        diff = sorted(
            k for k, v in state["train_config"].items() if k != "progress" and now.get(k) != v
        )
        if diff:
            raise ValueError(f"cannot resume with different training settings: {diff}")
        model.load_state_dict(state["model"])
        start_epoch, fitted = int(state["epoch"]), bool(state["fitted"])
        actions = [FitAction(**a) for a in state["fit_actions"]]
        rows = list(state["history"])
    else:
        torch.manual_seed(cfg.seed)
        calibrate(model, train_loader, cfg.calib_batches, method=cfg.calib_method)

    net = _wrap_ddp(model, device)
    weights, levels, gates = split_parameters(model)
    opt_w = torch.optim.SGD(
        weights, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    opt_q = torch.optim.Adam(
        [{"params": levels, "lr": cfg.lr_levels}, {"params": gates, "lr": cfg.lr_gates}]
    )
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total = max(cfg.epochs * steps_per_epoch, 1)
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    sched_w = torch.optim.lr_scheduler.LambdaLR(opt_w, cosine)
    sched_q = torch.optim.lr_scheduler.LambdaLR(opt_q, [cosine, lambda _: 1.0])
    constraint = BudgetConstraint(budget, cost_model, step=cfg.dual_step)
    tracker = (
        BudgetTracker(model, budget, cost_model, slack=cfg.track_slack)
        if cfg.track_slack is not None
        else None
    )
    if state is not None:
        opt_w.load_state_dict(state["opt_w"])
        opt_q.load_state_dict(state["opt_q"])
        sched_w.load_state_dict(state["sched_w"])
        sched_q.load_state_dict(state["sched_q"])
        constraint.load_state_dict(state["constraint"])
        if tracker is not None and state.get("tracker") is not None:
            tracker.load_state_dict(state["tracker"])
    if run_path is not None and _is_main():
        run_path.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_path if _is_main() else None, rows)
    fit_epoch = cfg.epochs - cfg.freeze_epochs
    anneal_steps = max(cfg.anneal * fit_epoch * steps_per_epoch, 1e-9)
    t0 = time.time()
    show = cfg.progress and _is_main()

    def do_fit() -> None:
        nonlocal fitted, actions
        grads = _gate_gradients(model, net, train_loader, cfg.fit_batches, device)
        actions = fit_to_budget(model, budget, cost_model, grads)
        _freeze_bits(model)
        fitted = True

    for epoch in range(start_epoch, cfg.epochs):
        _seed_epoch(train_loader, cfg.seed, epoch)
        if epoch == fit_epoch and not fitted:
            do_fit()
        model.train()
        loss_sum = correct = seen = 0.0
        moves_before = tracker.moves if tracker is not None else 0
        bar = progress(
            range(steps_per_epoch), show, desc=f"ddq {epoch + 1}/{cfg.epochs}", unit="step"
        )
        batches = iter(train_loader)
        for step in bar:
            constraint.set_progress((epoch * steps_per_epoch + step) / anneal_steps)
            x, y = next(batches)
            x, y = x.to(device), y.to(device)
            out = net(x)
            task = F.cross_entropy(out, y)
            loss = task if fitted else task + constraint.penalty()
            opt_w.zero_grad(set_to_none=True)
            opt_q.zero_grad(set_to_none=True)
            loss.backward()
            if tracker is not None and not fitted:
                tracker.observe()
            opt_w.step()
            opt_q.step()
            sched_w.step()
            sched_q.step()
            if not fitted:
                constraint.update()
                if tracker is not None:
                    tracker.enforce(constraint.target)
            loss_sum += task.item() * y.numel()
            correct += (out.argmax(1) == y).sum().item()
            seen += y.numel()
            # The postfix costs a walk of the cost model; refreshing it every 10 steps is
            # as readable and keeps it off the training step's profile.
            if hasattr(bar, "set_postfix") and (step % 10 == 0 or step == steps_per_epoch - 1):
                bar.set_postfix(
                    loss=f"{loss_sum / seen:.3f}",
                    acc=f"{100 * correct / seen:.1f}",
                    wbits=f"{cost_model.avg_weight_bits():.2f}",
                    budget=f"{100 * budget.usage(cost_model):.0f}%",
                )
        test_acc = evaluate(net, test_loader, device)
        log.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss_sum / max(seen, 1),
                "train_acc": 100 * correct / max(seen, 1),
                "test_acc": test_acc,
                "avg_w_bits": cost_model.avg_weight_bits(),
                "avg_a_bits": cost_model.avg_act_bits(),
                "size_bytes": cost_model.size_bytes(),
                "gbitops": cost_model.gbitops(),
                "budget_usage": budget.usage(cost_model),
                "lambda": constraint.lam,
                "bits_frozen": int(fitted),
                "bits_tracked": (tracker.moves if tracker is not None else 0) - moves_before,
                "lr": sched_w.get_last_lr()[0],
                "wall_s": time.time() - t0,
            }
        )
        if _is_main():  # one line per epoch even without progress bars (logs, CI)
            r = log.rows[-1]
            logger.info(
                "epoch %d/%d: loss %.4f test %.2f%% w-bits %.2f a-bits %.2f budget %.1f%%",
                epoch + 1, cfg.epochs, r["train_loss"], test_acc, r["avg_w_bits"],
                r["avg_a_bits"], 100 * r["budget_usage"],
            )  # fmt: skip
        if ckpt_path is not None and _is_main():
            save_checkpoint(
                ckpt_path,
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "opt_w": opt_w.state_dict(),
                    "opt_q": opt_q.state_dict(),
                    "sched_w": sched_w.state_dict(),
                    "sched_q": sched_q.state_dict(),
                    "constraint": constraint.state_dict(),
                    "tracker": tracker.state_dict() if tracker is not None else None,
                    "fitted": fitted,
                    "fit_actions": [dataclasses.asdict(a) for a in actions],
                    "history": log.rows,
                    "train_config": dataclasses.asdict(cfg),
                    "budget": budget.to_dict(),
                },
            )
    if not fitted:  # freeze_epochs == 0: the guarantee comes after the last epoch
        do_fit()
    test_acc = evaluate(net, test_loader, device)
    return TrainResult(
        history=log.rows,
        fit_actions=actions,
        test_acc=test_acc,
        budget_usage=budget.usage(cost_model),
        wall_s=time.time() - t0,
        extra={"bits_tracked": tracker.moves if tracker is not None else 0},
    )
