"""Multiply-accumulate counts per layer, measured with forward hooks on an example input."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..layers import LayerKind, kind_of
from ..quantizer import DDQQuantizer

__all__ = ["as_args", "count_macs", "quantizers_disabled"]


def as_args(example_inputs: Any) -> tuple[Any, ...]:
    """Example inputs as a positional-argument tuple."""
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


@contextmanager
def quantizers_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with every DDQ quantizer passing its input through."""
    qs = [m for m in model.modules() if isinstance(m, DDQQuantizer)]
    saved = [q.enabled for q in qs]
    for q in qs:
        q.enabled = False
    try:
        yield
    finally:
        for q, e in zip(qs, saved, strict=True):
            q.enabled = e


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: Any) -> tuple[dict[str, int], list[str]]:
    """MACs per sample of every supported layer (``LAYER_KINDS``) and their execution order.

    Runs one forward pass in eval mode with quantizers off (BatchNorm statistics and
    quantizer state are left untouched). A layer called twice counts twice.

    Example:
        >>> macs, order = count_macs(nn.Linear(4, 3), torch.zeros(1, 4))
        >>> macs, order
        ({'': 12}, [''])
    """
    macs: dict[str, int] = {}
    order: list[str] = []
    hooks = []

    def make_hook(name: str, kind: LayerKind):
        def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
            macs[name] = macs.get(name, 0) + kind.macs(module, out)
            if name not in order:
                order.append(name)

        return hook

    for name, m in model.named_modules():
        kind = kind_of(m)
        if kind is not None:
            hooks.append(m.register_forward_hook(make_hook(name, kind)))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with quantizers_disabled(model):
            model(*as_args(example_inputs))
    finally:
        for h in hooks:
            h.remove()
        for m, t in modes.items():
            m.training = t
    return macs, order
