"""Initialise activation ranges from a few calibration batches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..layers import QuantLayer, quantizers_of
from ..quantizer.observer import combine_processes
from .macs import as_args

__all__ = ["calibrate"]


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int = 8,
    method: str = "mse",
    keep_ranges: bool = False,
    reestimate_bn: bool = True,
) -> int:
    """Fit every quantizer to data: weights to the current weights, inputs to ``num_batches``.

    Every quantizer is (re-)initialised, so a stray forward before calibration (a quick
    "does it run" call on zeros after ``prepare``, which initialises input ranges from
    that batch) cannot leave collapsed ranges behind; ``keep_ranges=True`` calibrates only
    the quantizers that were never initialised. ``method`` is ``"mse"`` (MSE-searched
    step or Lloyd levels on a subsample of the observed inputs; the default, the better
    start in BENCHMARKS.md once BatchNorm is re-estimated) or ``"percentile"`` (levels
    spread evenly over the mean 0.01%/99.99% quantiles).
    A NaN or Inf in the data raises ``FloatingPointError`` naming the first layer whose
    input held it.

    With ``reestimate_bn`` (default) the BatchNorm running statistics are then
    re-estimated with the quantized model on the same number of batches (a cumulative
    average; averaged over processes under DDP): quantized weights shift every
    pre-BatchNorm distribution a little, and the FP32 statistics no longer normalise it.
    After calibration alone this took MobileNetV2 at W3A3 from 81% to 93% on MNIST
    (BENCHMARKS.md, start quality). ``batches`` is iterated a second time for it, or, if
    it is a one-shot iterator, the inputs of the first pass are kept.

    Batches may be tensors, tuples of positional inputs, dicts of keyword inputs, or
    ``(inputs, target)`` pairs from a ``DataLoader`` (the first element is used).
    Quantizers observe their inputs without quantizing them, so each layer sees float
    activations, and under DDP the statistics are combined so every process gets the
    same ranges.

    The model runs as it will in training: BatchNorm normalises with batch statistics
    (ranges observed with running statistics can be far off for a model whose statistics
    are stale, e.g. freshly initialised, and every layer would then clip), its running
    statistics are restored after this float pass (then re-estimated, see above), and
    dropout is off.

    Returns:
        The number of input quantizers calibrated from data.

    Example:
        >>> calibrate(model, loader, num_batches=4)   # doctest: +SKIP
        53
    """
    if method not in ("mse", "percentile"):
        raise ValueError(f"calibration method must be 'mse' or 'percentile', got {method!r}")
    weight_qs = set()
    for m in model.modules():
        if isinstance(m, QuantLayer):
            weight_qs.add(m.weight_quantizer)
            wq = m.weight_quantizer
            stale = not bool(wq.initialized) or not wq.fitted_to(m.weight)
            if stale and (not keep_ranges or not bool(wq.initialized)):
                wq.init_from(m.weight)
    targets = [
        q
        for q in quantizers_of(model).values()
        if q not in weight_qs and (not keep_ranges or not bool(q.initialized))
    ]
    bn_state = {
        # The BatchNorm's own state only: an output quantizer child (integer_graph) is
        # calibrated here and must not be rolled back with the statistics.
        m: {k: v.clone() for k, v in m.state_dict().items() if "." not in k}
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    for q in targets:
        q.start_calibration()
    seen = 0
    kept: list[Any] | None = [] if reestimate_bn and isinstance(batches, Iterator) else None
    with training_without_dropout(model):
        try:
            for batch in batches:
                if seen >= num_batches:
                    break
                inputs = _inputs_of(batch)
                _run(model, inputs)
                if kept is not None:
                    kept.append(inputs)
                seen += 1
            if seen == 0:
                raise ValueError("calibrate got no batches")
            # Decide on the batches every process saw: a branch reached on one process only
            # must still be fitted (from the gathered data) on all, or the gather would hang.
            seen_by = combine_processes(
                torch.tensor(
                    [q._observer.batches if q._observer is not None else 0 for q in targets],
                    dtype=torch.float64,
                ),
                "sum",
            )
            for q, n in zip(targets, seen_by.tolist(), strict=True):
                if q._observer is not None and n > 0:
                    q.finish_calibration(method)
                else:  # a branch the calibration data never reached: initialise on first use
                    q.calibrating = False
                    q._observer = None
        finally:
            for q in targets:
                q.calibrating = False
            for m, state in bn_state.items():
                m.load_state_dict(state, strict=False)
    if reestimate_bn:
        reestimate_batchnorm(model, batches if kept is None else kept, num_batches)
    return sum(bool(q.initialized) for q in targets)


@contextlib.contextmanager
def training_without_dropout(model: nn.Module) -> Iterator[None]:
    """``model`` in training mode (BatchNorm on batch statistics) with dropout off, as
    calibration runs it; every module's mode is restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    try:
        yield
    finally:
        for m, t in modes.items():
            m.training = t


def _run(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` with a tensor, a tuple of positional inputs or a dict of keywords."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*as_args(inputs))


def _inputs_of(batch: Any) -> Any:
    """The model inputs of a batch: a tensor, a tuple of inputs, or ``(inputs, target)``."""
    return batch[0] if isinstance(batch, list | tuple) and len(batch) == 2 else batch


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[Any], num_batches: int = 8) -> int:
    """Recompute every BatchNorm's running statistics with the model as it is now.

    The statistics are a cumulative average over ``num_batches`` batches of the model in
    training mode (dropout off), then averaged over processes under DDP so every process
    keeps the same buffers. Returns the number of batches used; with none, the previous
    statistics are kept.

    Example:
        >>> reestimate_batchnorm(quantized_model, train_loader, num_batches=8)  # doctest: +SKIP
        8
    """
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns:
        return 0
    backup = {b: {k: v.clone() for k, v in b.state_dict().items() if "." not in k} for b in bns}
    momenta = {b: b.momentum for b in bns}
    for b in bns:
        b.reset_running_stats()
        b.momentum = None  # cumulative moving average
    seen = 0
    with training_without_dropout(model):
        try:
            for batch in batches:
                if seen >= num_batches:
                    break
                _run(model, _inputs_of(batch))
                seen += 1
            if seen and dist.is_available() and dist.is_initialized():
                world = dist.get_world_size()
                for b in bns:
                    for t in (b.running_mean, b.running_var):
                        dist.all_reduce(t)
                        t.div_(world)
        finally:
            for b in bns:
                b.momentum = momenta[b]
                if not seen:
                    b.load_state_dict(backup[b], strict=False)
    return seen
