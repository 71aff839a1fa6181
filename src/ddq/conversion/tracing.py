"""The ``torch.fx`` tracer the graph passes of conversion share (``output_quantizers``,
``bias_rounding``): it stops at the modules the caller names and counts every module call.

Both passes read the model's data flow between quantized layers, BatchNorms and
quantizers, not the insides of those modules; and a hook on a module that the forward
calls twice fires twice, so they need the call counts too.

Example:
    >>> from torch import nn
    >>> t = CountingTracer(lambda m: isinstance(m, nn.Linear))
    >>> graph = t.trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    >>> t.calls
    {'0': 1, '1': 1}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["CountingTracer"]


class CountingTracer(torch.fx.Tracer):
    """A ``torch.fx.Tracer`` whose leaves are the modules ``leaf`` accepts (besides fx's
    own leaves), and whose ``calls`` maps each module path to its number of calls."""

    def __init__(self, leaf: Callable[[nn.Module], bool]) -> None:
        super().__init__()
        self.leaf = leaf
        self.calls: dict[str, int] = {}

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        path = self.path_of_module(m)
        self.calls[path] = self.calls.get(path, 0) + 1
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self.leaf(m) or super().is_leaf_module(m, qualname)
