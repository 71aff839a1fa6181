"""``transformers``' ``Conv1D`` (GPT-2, GPT, ...) as an ``nn.Linear``, so ``prepare`` quantizes it.

Hugging Face's ``transformers.pytorch_utils.Conv1D`` is a linear layer whose weight is
stored transposed, ``(in_features, out_features)``, and whose forward is
``addmm(bias, x, weight)``: ``y = x W + b``. ``ddq.prepare`` quantizes exact
``nn.Linear``/``nn.Conv*`` types only, so GPT-2's attention (``c_attn``, ``c_proj``) and MLP
(``c_fc``, ``c_proj``) layers would stay float. The rewrite registered here (see
:mod:`ddq.layers.rewrite`; ``prepare`` and ``ddq.load`` both apply it) replaces each
``Conv1D`` by an ``nn.Linear`` holding the transposed weight (a copy) and the bias: the same
function in float, up to the rounding of a different GEMM order.

``transformers`` is not imported here: the rewrite matches the class by its module and
name, so ``import ddq`` stays free of it and the rewrite costs nothing without it.

Tied weights: the rewrite touches only ``Conv1D``; GPT-2's ``lm_head`` is already an
``nn.Linear`` whose weight *is* the token embedding's (``wte``). ``prepare`` quantizes the
head (the last layer: 8 bits under the default first/last convention) and the embedding
lookup keeps reading the same float parameter, which both paths train. ``ddq.export``
stores that float table once (under ``transformer.wte.weight``) plus the head's packed
indices; ``ddq.load`` rebuilds the tied model, swaps in the packed head (no longer tied)
and loads the table into the embedding, so the result reproduces the fake-quantized
model's logits. ``skip=["lm_head"]`` keeps the head float instead.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Conv1D(nn.Module):  # what transformers defines, for the example
    ...     def __init__(self, nf, nx):
    ...         super().__init__()
    ...         self.nf, self.nx = nf, nx
    ...         self.weight = nn.Parameter(torch.randn(nx, nf))
    ...         self.bias = nn.Parameter(torch.randn(nf))
    ...     def forward(self, x):
    ...         return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
    >>> Conv1D.__module__ = "transformers.pytorch_utils"
    >>> conv = Conv1D(3, 4)
    >>> linear = linear_from_conv1d(conv)
    >>> linear
    Linear(in_features=4, out_features=3, bias=True)
    >>> x = torch.randn(2, 4)
    >>> torch.testing.assert_close(linear(x), conv(x))
"""

from __future__ import annotations

import torch
from torch import nn

from .rewrite import register_rewrite

__all__ = ["REWRITE_NAME", "is_hf_conv1d", "linear_from_conv1d"]

#: The name under which the rewrite is registered.
REWRITE_NAME = "transformers.Conv1D"


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is exactly ``transformers``' ``Conv1D`` (matched by module and name).

    A subclass is not matched: it may compute something else in its forward.

    Example:
        >>> is_hf_conv1d(nn.Linear(2, 3))
        False
    """
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.split(".", 1)[0] == "transformers"


def linear_from_conv1d(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing ``module``'s ``x @ weight + bias`` (weight copied, transposed).

    Same device, dtype and ``requires_grad`` as the original parameters. The copy gives new
    parameter objects: build optimizers after ``ddq.prepare``.
    """
    weight: torch.Tensor = module.weight
    bias: torch.Tensor | None = getattr(module, "bias", None)
    if weight.dim() != 2:
        raise ValueError(f"Conv1D weight must be 2-D (in, out), got shape {tuple(weight.shape)}")
    in_f, out_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight.t())
        layer.weight.requires_grad_(weight.requires_grad)
        if bias is not None:
            layer.bias.copy_(bias)
            layer.bias.requires_grad_(bias.requires_grad)
    layer.train(module.training)
    return layer


register_rewrite(REWRITE_NAME, is_hf_conv1d, linear_from_conv1d)
