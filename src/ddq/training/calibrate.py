"""Initialise activation ranges from a few calibration batches."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..conversion.macs import as_args
from ..layers import QuantLayer, quantizers_of

__all__ = ["calibrate"]


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int = 8,
    method: str = "percentile",
    keep_ranges: bool = False,
) -> int:
    """Fit every quantizer to data: weights to the current weights, inputs to ``num_batches``.

    Every quantizer is (re-)initialised, so a stray forward before calibration (a quick
    "does it run" call on zeros after ``prepare``, which initialises input ranges from
    that batch) cannot leave collapsed ranges behind; ``keep_ranges=True`` calibrates only
    the quantizers that were never initialised. ``method`` is ``"percentile"`` (levels
    spread evenly over the mean 0.01%/99.99% quantiles; the default, the better start in
    BENCHMARKS.md) or ``"mse"`` (MSE-searched step or Lloyd levels on a subsample of the
    observed inputs).
    A NaN or Inf in the data raises ``FloatingPointError`` naming the first layer whose
    input held it.

    Batches may be tensors, tuples of positional inputs, or ``(inputs, target)`` pairs
    from a ``DataLoader`` (the first element is used). Quantizers observe their inputs
    without quantizing them, so each layer sees float activations, and under DDP the
    statistics are all-reduced so every process gets the same ranges.

    The model runs as it will in training: BatchNorm normalises with batch statistics
    (ranges observed with running statistics can be far off for a model whose statistics
    are stale, e.g. freshly initialised, and every layer would then clip), while its
    running statistics are restored afterwards and dropout is off.

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
    modes = {m: m.training for m in model.modules()}
    bn_state = {
        m: {k: v.clone() for k, v in m.state_dict().items()}
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    for q in targets:
        q.start_calibration()
    seen = 0
    try:
        for batch in batches:
            if seen >= num_batches:
                break
            inputs = batch[0] if isinstance(batch, list | tuple) and len(batch) == 2 else batch
            model(*as_args(inputs))
            seen += 1
        if seen == 0:
            raise ValueError("calibrate got no batches")
        # Decide on the batches every process saw: a branch reached on one process only
        # must still be fitted (from the gathered data) on all, or the gather would hang.
        seen_by = torch.tensor(
            [q._observer.batches if q._observer is not None else 0 for q in targets],
            dtype=torch.float64,
        )
        if dist.is_available() and dist.is_initialized():
            dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
            seen_by = seen_by.to(dev)
            dist.all_reduce(seen_by)
            seen_by = seen_by.cpu()
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
            m.load_state_dict(state)
        for m, t in modes.items():
            m.training = t
    return sum(bool(q.initialized) for q in targets)
