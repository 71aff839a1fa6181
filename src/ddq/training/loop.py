"""The DDQ training loop: task loss + budget constraint, then a guaranteed fit, then
fine-tuning at the final bits. A thin loop over ``DDQTrainer`` (write your own the same
way). Usable from Python and from the ``ddq`` CLI; runs under ``torchrun`` (PyTorch DDP)
unchanged."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..budget import Budget, FitAction
from ..conversion.calibrate import calibrate
from .checkpoint import load_checkpoint, save_checkpoint
from .lifecycle import DDQTrainer, TrainConfig
from .progress import MetricsLog, progress

__all__ = [
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "top1_accuracy",
    "train_ddq",
    "train_float",
]

logger = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], torch.Tensor]
MetricFn = Callable[[Any, Any], Any]
BatchFn = Callable[[Any], tuple[Any, Any]]


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


def top1_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example top-1 accuracy in percent (100 or 0): the default ``metric_fn``."""
    return 100.0 * (outputs.argmax(1) == targets).float()


def _inputs_targets(batch: Any) -> tuple[Any, Any]:
    """The default batch structure: ``(inputs, targets)``."""
    try:
        inputs, targets = batch
    except (TypeError, ValueError):
        raise ValueError(
            f"a batch must be an (inputs, targets) pair, got {type(batch).__name__}; "
            "pass batch_to_inputs_targets= for other batch structures"
        ) from None
    return inputs, targets


def _to(obj: Any, device: str | torch.device) -> Any:
    """Move the tensors in ``obj`` (a tensor, or a tuple, list or dict of them) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _forward(net: nn.Module, inputs: Any) -> Any:
    """``net(inputs)``; a tuple or list is passed as positional and a dict as keyword inputs."""
    if isinstance(inputs, tuple | list):
        return net(*inputs)
    if isinstance(inputs, dict):
        return net(**inputs)
    return net(inputs)


def _count(targets: Any) -> int:
    """Examples in a batch, by its targets."""
    if isinstance(targets, torch.Tensor):
        return int(targets.shape[0]) if targets.dim() else 1
    return len(targets) if hasattr(targets, "__len__") else 1


class _CalibrationBatches:
    """``(inputs, None)`` pairs of a loader, re-iterable like the loader itself (``calibrate``
    reads the batches twice: ranges, then BatchNorm statistics)."""

    def __init__(self, loader: Any, split: BatchFn, device: str | torch.device) -> None:
        self.loader, self.split, self.device = loader, split, device

    def __iter__(self) -> Any:
        return ((_to(self.split(batch)[0], self.device), None) for batch in self.loader)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: str | torch.device = "cpu",
    metric_fn: MetricFn | None = None,
    batch_to_inputs_targets: BatchFn | None = None,
) -> float:
    """The mean of ``metric_fn(outputs, targets)`` over ``loader`` (summed over processes
    under DDP); by default top-1 accuracy in percent.

    ``metric_fn`` returns per-example scores (a tensor whose mean over every element of
    every batch is reported) or one number per batch. ``batch_to_inputs_targets`` splits a
    batch (default: an ``(inputs, targets)`` pair); a tuple of inputs is passed as
    positional and a dict as keyword arguments.

    Example:
        >>> evaluate(model, test_loader)  # doctest: +SKIP
        98.7
    """
    metric = top1_accuracy if metric_fn is None else metric_fn
    split = _inputs_targets if batch_to_inputs_targets is None else batch_to_inputs_targets
    was = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        inputs, targets = _to(split(batch), device)
        m = torch.as_tensor(metric(_forward(model, inputs), targets), device=device)
        total[0] += m.sum()
        total[1] += m.numel()
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train(was)
    return float(total[0] / total[1].clamp(min=1))


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


def _config_defaults() -> dict[str, Any]:
    """Every ``TrainConfig`` field's default."""
    return {
        f.name: f.default
        for f in dataclasses.fields(TrainConfig)
        if f.default is not dataclasses.MISSING
    }


def _wrap_ddp(model: nn.Module, device: str | torch.device) -> nn.Module:
    if not dist.is_initialized():
        return model
    dev = torch.device(device)
    ids = [dev.index] if dev.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def train_ddq(
    model: nn.Module,
    train_loader: DataLoader,
    test_loader: DataLoader,
    budget: Budget,
    config: TrainConfig | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    *,
    loss_fn: LossFn | None = None,
    metric_fn: MetricFn | None = None,
    batch_to_inputs_targets: BatchFn | None = None,
) -> TrainResult:
    """Train a prepared model to ``budget`` and guarantee it is met.

    Epochs ``1..epochs - freeze_epochs`` learn weights, levels and bits with the loss
    ``loss_fn + lambda (cost / target - 1)`` (``lambda`` adapted by dual ascent). Then
    ``fit_to_budget`` closes the bits training pushed lowest (or reopens the most useful
    ones) until the model meets the budget, bits are frozen, and the last
    ``freeze_epochs`` fine-tune weights and levels at those bits. A checkpoint is written
    atomically after every epoch; ``resume=True`` continues from it and ends with the same
    result as an uninterrupted run. The loop is a thin one over ``DDQTrainer``.

    Args:
        loss_fn: ``loss_fn(outputs, targets)``, a scalar (default cross-entropy).
        metric_fn: ``metric_fn(outputs, targets)``, per-example scores whose mean is
            reported as ``train_acc``/``test_acc`` (default top-1 accuracy in percent).
        batch_to_inputs_targets: splits a batch into ``(inputs, targets)`` (default: the
            batch is that pair); a tuple of inputs is passed to the model as positional
            and a dict as keyword arguments.

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
    task_loss = F.cross_entropy if loss_fn is None else loss_fn
    metric = top1_accuracy if metric_fn is None else metric_fn
    split = _inputs_targets if batch_to_inputs_targets is None else batch_to_inputs_targets
    model.to(device)
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    trainer = DDQTrainer(model, budget, cfg, steps_per_epoch=steps_per_epoch)
    cost_model = trainer.cost_model

    start_epoch, rows = 0, []
    state = None
    if resume:
        if ckpt_path is None or not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = load_checkpoint(ckpt_path)
        now = dataclasses.asdict(cfg)
        # A setting the checkpoint lacks was added after it was written; the run behaved
        # as that setting's default does (new settings default to the old behaviour).
        saved = _config_defaults() | dict(state["train_config"])
        diff = sorted(k for k, v in saved.items() if k != "progress" and now.get(k) != v)
        if diff:
            raise ValueError(f"cannot resume with different training settings: {diff}")
        model.load_state_dict(state["model"])
        start_epoch = int(state["epoch"])
        trainer.load_state_dict({"steps": start_epoch * steps_per_epoch, **state})
        rows = list(state["history"])
    else:
        torch.manual_seed(cfg.seed)
        # The module-level ``calibrate`` (what ``trainer.calibrate`` runs), so that tests
        # and tools can observe it here; (inputs, targets) batches go to it as they are.
        calib: Any = train_loader
        if batch_to_inputs_targets is not None:
            calib = _CalibrationBatches(train_loader, split, device)
        calibrate(model, calib, cfg.calib_batches, method=cfg.calib_method)

    net = _wrap_ddp(model, device)
    opt = trainer.optimizer()
    if state is not None:
        opt.load_state_dict(state)
    if run_path is not None and _is_main():
        run_path.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_path if _is_main() else None, rows)
    t0 = time.time()
    show = cfg.progress and _is_main()
    tracker = trainer.tracker

    def batch_loss(_model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = _to(split(batch), device)
        return task_loss(_forward(net, inputs), targets)  # through DDP: gradients agree

    def finalize() -> None:
        trainer.finalize(train_loader, batch_loss, cfg.fit_batches)

    for epoch in range(start_epoch, cfg.epochs):
        _seed_epoch(train_loader, cfg.seed, epoch)
        if trainer.should_finalize:
            finalize()
        model.train()
        loss_sum = metric_sum = seen = scored = 0.0
        moves_before = tracker.moves if tracker is not None else 0
        bar = progress(
            range(steps_per_epoch), show, desc=f"ddq {epoch + 1}/{cfg.epochs}", unit="step"
        )
        batches = iter(train_loader)
        for step in bar:
            inputs, targets = _to(split(next(batches)), device)
            out = _forward(net, inputs)
            task = task_loss(out, targets)
            loss = trainer.loss(task)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            trainer.clip_gradients()  # config.grad_clip; a no-op when None
            opt.step()
            trainer.step()
            n = _count(targets)
            loss_sum += task.item() * n
            seen += n
            with torch.no_grad():
                m = torch.as_tensor(metric(out.detach(), targets))
            metric_sum += m.sum().item()
            scored += m.numel()
            # The postfix costs a walk of the cost model; refreshing it every 10 steps is
            # as readable and keeps it off the training step's profile.
            if hasattr(bar, "set_postfix") and (step % 10 == 0 or step == steps_per_epoch - 1):
                bar.set_postfix(
                    loss=f"{loss_sum / seen:.3f}",
                    acc=f"{metric_sum / max(scored, 1):.1f}",
                    wbits=f"{cost_model.avg_weight_bits():.2f}",
                    budget=f"{100 * trainer.usage():.0f}%",
                )
        test_acc = evaluate(net, test_loader, device, metric, split)
        log.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss_sum / max(seen, 1),
                "train_acc": metric_sum / max(scored, 1),
                "test_acc": test_acc,
                "avg_w_bits": cost_model.avg_weight_bits(),
                "avg_a_bits": cost_model.avg_act_bits(),
                "size_bytes": cost_model.size_bytes(),
                "gbitops": cost_model.gbitops(),
                "budget_usage": trainer.usage(),
                "lambda": trainer.lam,
                "bits_frozen": int(trainer.fitted),
                "bits_tracked": (tracker.moves if tracker is not None else 0) - moves_before,
                "lr": opt.get_last_lr(),
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
                    **opt.state_dict(),  # opt_w, opt_q, sched_w, sched_q
                    **trainer.state_dict(),  # steps, constraint, tracker, fitted, fit_actions, budget
                    "history": log.rows,
                    "train_config": dataclasses.asdict(cfg),
                },
            )
    if not trainer.fitted:  # freeze_epochs == 0: the guarantee comes after the last epoch
        finalize()
    test_acc = evaluate(net, test_loader, device, metric, split)
    return TrainResult(
        history=log.rows,
        fit_actions=trainer.fit_actions,
        test_acc=test_acc,
        budget_usage=trainer.usage(),
        wall_s=time.time() - t0,
        extra={"bits_tracked": tracker.moves if tracker is not None else 0},
    )
