"""The brevitas baseline: integer weight and input quantizers at a fixed bitwidth.

Every Conv2d/Linear becomes its brevitas counterpart with a per-tensor float-scaled integer
weight quantizer (``Int8WeightPerTensorFloat`` at ``bits``) and an input quantizer
(``Uint8ActPerTensorFloat`` where the layer's float input is never negative, else
``Int8ActPerTensorFloat``, at ``bits``). The first and last layer use 8 bits, the same
convention as ddq's default, so model sizes compare.
"""

from __future__ import annotations

import torch
from torch import nn


def _input_signs(model: nn.Module, example: torch.Tensor) -> dict[str, bool]:
    signs: dict[str, bool] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):

            def hook(mod, inp, out, name=name):
                signs[name] = signs.get(name, False) or bool((inp[0] < 0).any())

            hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    with torch.no_grad():
        model(example)
    model.train(was)
    for h in hooks:
        h.remove()
    return signs


def brevitas_quantize(model: nn.Module, bits: int, example: torch.Tensor) -> nn.Module:
    """Replace every Conv2d/Linear of ``model`` in place by a brevitas layer at ``bits``."""
    import brevitas.nn as qnn
    from brevitas.quant import (
        Int8ActPerTensorFloat,
        Int8WeightPerTensorFloat,
        Uint8ActPerTensorFloat,
    )

    signed = _input_signs(model, example)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    first, last = names[0], names[-1]
    for name in names:
        m = model.get_submodule(name)
        b = 8 if name in (first, last) else bits
        act = Int8ActPerTensorFloat if signed[name] else Uint8ActPerTensorFloat
        common = dict(weight_quant=Int8WeightPerTensorFloat, weight_bit_width=b,
                      input_quant=act, input_bit_width=b, return_quant_tensor=False)  # fmt: skip
        if isinstance(m, nn.Conv2d):
            new = qnn.QuantConv2d(
                m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                padding=m.padding, dilation=m.dilation, groups=m.groups,
                bias=m.bias is not None, **common,
            )  # fmt: skip
        else:
            new = qnn.QuantLinear(m.in_features, m.out_features, bias=m.bias is not None, **common)
        new.load_state_dict(m.state_dict(), strict=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model
