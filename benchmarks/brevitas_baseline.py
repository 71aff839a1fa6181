"""The brevitas baselines: integer weight and input quantizers at a fixed bitwidth.

Every Conv2d/Linear becomes its brevitas counterpart (``QuantConv2d``/``QuantLinear``) with
a weight quantizer and an input quantizer at ``bits`` (unsigned where the layer's float
input is never negative, else signed). The first and last layer use 8 bits, the same
convention as ddq's default, so model sizes compare. Recipes (``RECIPES``):

- ``"perchannel"`` (the default): brevitas's own low-bit recipe, the common quantizers of
  ``brevitas_examples/imagenet_classification/models/common.py`` (the 4-bit MobileNet V1 /
  ProxylessNAS QAT models): ``CommonIntWeightPerChannelQuant`` (``Int8WeightPerTensorFloat``
  with ``scaling_per_output_channel=True``: per-channel max-abs scale, narrow range),
  ``CommonIntActQuant``/``CommonUintActQuant`` (``Int8ActPerTensorFloat``/
  ``Uint8ActPerTensorFloat``: a learned scale, initialised from the 99.999th percentile,
  restricted to a learned log, ``RestrictValueType.LOG_FP``), bit width set per layer.
  They are defined below from ``brevitas.quant`` (``brevitas_examples`` is not a package
  on PyPI); same attributes as the examples.
- ``"mse"``: ``Int8WeightPerChannelFloatMSE`` (per-channel scale searched for the least
  weight MSE, then learned) with ``Int8ActPerTensorFloatMSE``/``Uint8ActPerTensorFloatMSE``
  (activation scale searched for the least MSE on calibration data, then learned).
- ``"pertensor"``: the recipe of the first two versions of the benchmark,
  ``Int8WeightPerTensorFloat`` and ``Int8ActPerTensorFloat``/``Uint8ActPerTensorFloat``.

Post-training calibration (``brevitas_calibrate``) follows brevitas_examples'
``ptq_common``: ``calibrate`` (forward passes under ``brevitas.graph.calibrate.
calibration_mode``: quantization off, activation statistics collected, scales initialised
on exit), then ``calibrate_bn`` (``norm_correction_mode``: BatchNorm statistics
re-estimated on the quantized model, as ddq's calibration does).

One guard, not in brevitas: ``norm_correction_mode`` (brevitas 0.13, unchanged upstream)
ends with ``a = sqrt(old_var / new_var)``, ``running_var = old_var / a``,
``running_mean = (old_mean - (old_mean - a new_mean)) / a``: the new mean and the
geometric mean of the old and new variances. A channel that is constant on the quantized
model (new variance 0) makes ``a`` infinite and its mean ``inf * 0 = NaN``; every output
of the model is then NaN. At W2A2 on MobileNetV2 this happens after the first depthwise
convolution: the 2-bit unsigned input quantizer (per tensor, 99.999th percentile scale
1.24) rounds every value of 8 of its 32 ReLU6 channels (maxima 0.38 to 0.58) to 0, and a
depthwise channel of zeros stays 0. ``brevitas_calibrate`` sets such channels to the
limit of brevitas's own formula (mean = the new mean, variance = sqrt(old * 0) = 0);
every finite statistic is left exactly as brevitas computed it. And ``norm_correction_mode``
leaves every BatchNorm's ``momentum`` at ``None`` (a cumulative average: brevitas_examples
only evaluate after it); ``brevitas_calibrate`` restores it, so QAT updates the running
statistics as for every other method (ddq's ``reestimate_batchnorm`` restores it too).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

RECIPES = ("perchannel", "mse", "pertensor")


def quantized_layer_names(model: nn.Module) -> tuple[list[str], str, str]:
    """Names of the Conv2d/Linear layers (in module order), and the first and the last."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return names, names[0], names[-1]


def input_signs(model: nn.Module, example: torch.Tensor) -> dict[str, bool]:
    """Per Conv2d/Linear: whether its float input takes a negative value on ``example``."""
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


def _quantizers(recipe: str):
    """(weight quantizer, signed input quantizer, unsigned input quantizer) of a recipe."""
    from brevitas.core.restrict_val import RestrictValueType
    from brevitas.quant import (
        Int8ActPerTensorFloat,
        Int8ActPerTensorFloatMSE,
        Int8WeightPerChannelFloatMSE,
        Int8WeightPerTensorFloat,
        Uint8ActPerTensorFloat,
        Uint8ActPerTensorFloatMSE,
    )

    if recipe == "perchannel":

        class CommonIntWeightPerChannelQuant(Int8WeightPerTensorFloat):
            scaling_min_val = 2e-16
            bit_width = None
            scaling_per_output_channel = True

        class CommonIntActQuant(Int8ActPerTensorFloat):
            scaling_min_val = 2e-16
            bit_width = None
            restrict_scaling_type = RestrictValueType.LOG_FP

        class CommonUintActQuant(Uint8ActPerTensorFloat):
            scaling_min_val = 2e-16
            bit_width = None
            restrict_scaling_type = RestrictValueType.LOG_FP

        return CommonIntWeightPerChannelQuant, CommonIntActQuant, CommonUintActQuant
    if recipe == "mse":
        return Int8WeightPerChannelFloatMSE, Int8ActPerTensorFloatMSE, Uint8ActPerTensorFloatMSE
    if recipe == "pertensor":
        return Int8WeightPerTensorFloat, Int8ActPerTensorFloat, Uint8ActPerTensorFloat
    raise ValueError(f"unknown brevitas recipe {recipe!r}; expected one of {RECIPES}")


def brevitas_quantize(
    model: nn.Module, bits: int, example: torch.Tensor, recipe: str = "perchannel"
) -> nn.Module:
    """Replace every Conv2d/Linear of ``model`` in place by a brevitas layer at ``bits``."""
    import brevitas.nn as qnn

    weight_quant, act_signed, act_unsigned = _quantizers(recipe)
    signed = input_signs(model, example)
    names, first, last = quantized_layer_names(model)
    for name in names:
        m = model.get_submodule(name)
        b = 8 if name in (first, last) else bits
        act = act_signed if signed[name] else act_unsigned
        common = dict(weight_quant=weight_quant, weight_bit_width=b,
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


def brevitas_calibrate(model: nn.Module, batches: Iterable, correct_norm: bool = True) -> None:
    """Initialise every activation scale from ``batches`` of ``(inputs, targets)``, as
    brevitas_examples' ``ptq_common.calibrate`` (eval mode, ``calibration_mode``); then,
    with ``correct_norm``, re-estimate the BatchNorm statistics of the quantized model
    as its ``ptq_common.calibrate_bn`` (``norm_correction_mode``), with the two guards of
    the module docstring (constant channels, BatchNorm momentum)."""
    from brevitas.graph.calibrate import calibration_mode, norm_correction_mode

    batches = list(batches)
    was = model.training
    model.eval()
    with torch.no_grad(), calibration_mode(model):
        for x, _ in batches:
            model(x)
    if correct_norm:
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = {m: m.momentum for m in bns}
        with torch.no_grad(), norm_correction_mode(model):
            for x, _ in batches:
                model(x)
            new_mean = {m: m.running_mean.clone() for m in bns}
        with torch.no_grad():
            for m in bns:  # norm_correction_mode's 0 / 0 where a channel is constant
                bad = ~(torch.isfinite(m.running_mean) & torch.isfinite(m.running_var))
                m.running_mean[bad] = new_mean[m][bad]
                m.running_var[bad] = 0.0
                m.momentum = momenta[m]
    model.train(was)
