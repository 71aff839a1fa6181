"""Integer bias rounding: what an integer runtime does to a quantized layer's bias.

ONNX Runtime runs ``DQ(x), DQ(w) -> Conv/Gemm`` (``DDQConfig.integer_graph``) as an
integer kernel (``QLinearConv``/``QGemm``) whose int32 accumulator also holds the bias. It
therefore rounds the float bias (with a following BatchNorm folded in, as the export folds
it) onto the accumulator's step ``s_x * s_w[c]`` (input activation step times the
BatchNorm-folded weight step of channel ``c``)::

    b'[c] = round(b[c] / (s_x s_w[c])) * s_x s_w[c]

Each move is below half an accumulator step, but at 4-bit activations the output codes it
flips compound through a deep network (a trained MobileNetV2 agreed with ONNX Runtime on
98.5% of top-1 without this). So an ``integer_graph`` model computes ``b'`` itself: in
eval mode, every quantized layer whose input is quantized by a uniform activation
quantizer adds ``delta[c] = b'[c] - b[c]`` after its BatchNorm (or to its own output when
no BatchNorm follows). Training mode is untouched (a training BatchNorm uses batch
statistics: there is no folded bias to round), and so are models without
``integer_graph``.

The correction is a forward hook on the module it follows (prepended, so that an output
quantizer on that module sees the corrected values) and a callable that computes
``delta`` from the current parameters, so it follows every parameter update. The
deploy runtime (``ddq.load``) attaches the same hook to its packed layers and
``ChannelAffine`` modules with its own callable, built from the same numbers through
:func:`rounding_delta`, so it reproduces the PyTorch model bit for bit; the ONNX export
writes ``b'`` as the (folded) bias, which ONNX Runtime's rounding then leaves in place.

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    >>> ddq.prepare(net, ddq.preset("uniform"), example_inputs=x)  # doctest: +SKIP
    >>> sorted(bias_roundings(net))  # doctest: +SKIP
    ['1']
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..layers import QuantLayer, kind_of
from ..quantizer import DDQQuantizer
from .tracing import CountingTracer

__all__ = [
    "BIAS_DELTA",
    "INT8_MAX",
    "LINEAR_OUTPUT",
    "applies",
    "attach_bias_rounding",
    "batchnorm_affine",
    "bias_roundings",
    "find_bias_targets",
    "integer_weight_step",
    "remove_bias_rounding",
    "rounding_delta",
    "set_bias_rounding",
]

#: The key, in the target module's ``__dict__`` (not a child module nor a state-dict
#: entry), of its zero-argument callable that returns ``delta`` (or ``None``: no change).
BIAS_DELTA = "_ddq_bias_delta"
#: The key of the target's flag "a Linear's own output" (see :func:`set_bias_rounding`).
LINEAR_OUTPUT = "_ddq_bias_linear"

#: Adaptive weights export as symmetric int8 codes ``-127..127`` (``ddq.deploy.int8_codes``).
INT8_MAX = 127


@torch.no_grad()
def batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as ``y = x * scale + bias`` per channel.

    Mathematically ``scale = gamma / sqrt(var + eps)`` and ``bias = beta - mean * scale``.
    They are read off PyTorch's own inference kernel (``scale`` as its output for ``x = 1``
    with ``mean = beta = 0``, ``bias`` as its output for ``x = 0``) rather than recomputed,
    because that kernel rounds them its own way (``rsqrt`` and a fused multiply-add); with
    the very same numbers the runtime reproduces the trained model bit for bit.

    Example:
        >>> bn = nn.BatchNorm2d(2).eval()
        >>> batchnorm_affine(bn)[0]
        tensor([1.0000, 1.0000])
    """
    c = bn.num_features
    var = bn.running_var.float().cpu()
    mean = bn.running_mean.float().cpu()
    weight = None if bn.weight is None else bn.weight.detach().float().cpu()
    zero = torch.zeros(c)
    scale = F.batch_norm(torch.ones(1, c), zero, var, weight, zero, False, 0.0, bn.eps)[0]
    bias_in = zero if bn.bias is None else bn.bias.detach().float().cpu()
    bias = F.batch_norm(torch.zeros(1, c), mean, var, weight, bias_in, False, 0.0, bn.eps)[0]
    return scale, bias


def integer_weight_step(
    mode: str,
    scale: float | None,
    channel_scales: torch.Tensor | None,
    table: torch.Tensor,
) -> torch.Tensor:
    """The exported weight's integer step per output channel (float32, length ``C`` or 1).

    Uniform weights: ``scale`` (float32) times the channel scale, as the export writes it.
    Adaptive weights: their int8 form's step, ``channel_scale * max|level| / 127``
    (``ddq.deploy.int8_codes.adaptive_to_int8``, same float operations).

    Example:
        >>> integer_weight_step("uniform", 0.5, torch.tensor([1.0, 2.0]), torch.zeros(2))
        tensor([0.5000, 1.0000])
    """
    if mode == "uniform":
        assert scale is not None
        if channel_scales is None:
            return torch.tensor([scale], dtype=torch.float32)
        return (channel_scales.detach().cpu().double() * scale).float()
    peak = float(table.detach().float().abs().max())
    step = peak / INT8_MAX if peak > 0 else 1.0
    if channel_scales is None:
        return torch.tensor([step], dtype=torch.float32)
    return (channel_scales.detach().float().cpu() * step).to(torch.float32)


@torch.no_grad()
def rounding_delta(
    bias: torch.Tensor | None,
    bn: tuple[torch.Tensor, torch.Tensor] | None,
    w_step: torch.Tensor,
    x_scale: float,
) -> torch.Tensor:
    """``b' - b``: the folded bias ``b`` moved onto the accumulator grid ``s_x * s_w[c]``.

    The arithmetic is ONNX Runtime's, in float32: the export folds a BatchNorm
    ``(scale c, shift d)`` as ``b = bias * c + d`` and ``s_w = float32(float64(step) * c)``;
    ONNX Runtime then takes ``q = round(b / (s_x * s_w))`` (half to even) and adds ``q`` to
    the int32 accumulator, i.e. the bias ``q * s_x * s_w``. A zero step leaves the bias.

    Args:
        bias: the layer's bias (``None``: zero).
        bn: the following BatchNorm as ``(scale, shift)`` (:func:`batchnorm_affine`), or None.
        w_step: :func:`integer_weight_step` (length ``C`` or 1).
        x_scale: the input activation's step (float32 value).

    Example:
        >>> rounding_delta(torch.tensor([0.3]), None, torch.tensor([0.5]), 0.5)
        tensor([-0.0500])
    """
    if bn is None:
        channels = max(w_step.numel(), 0 if bias is None else bias.numel())
        c = torch.ones(channels)
        d = torch.zeros(channels)
    else:
        c, d = bn[0].float().cpu(), bn[1].float().cpu()
    b = d if bias is None else (bias.detach().float().cpu() * c + d)
    folded = w_step.double() * c.double() if bn is not None else w_step.double()
    s_w = folded.float().expand_as(b)
    bias_step = torch.tensor(x_scale, dtype=torch.float32) * s_w
    safe = torch.where(bias_step > 0, bias_step, torch.ones_like(bias_step))
    rounded = torch.round(b / safe) * safe
    return torch.where(bias_step > 0, rounded - b, torch.zeros_like(b))


def applies(module: nn.Module, rank: int) -> bool:
    """Whether ``module``'s rounding applies to an output of ``rank`` dimensions.

    A Linear's own output is rounded only when it is 2-D: the export writes it as
    ``Gemm``, whose bias ONNX Runtime quantizes; a Linear on ``(N, T, C)`` becomes
    ``MatMul`` then a float ``Add``, which keeps its bias as is.

    Example:
        >>> applies(nn.ReLU(), 4)
        True
    """
    return not module.__dict__.get(LINEAR_OUTPUT, False) or rank == 2


def _add_delta(module: nn.Module, args: Any, output: Any) -> Any:
    """The forward hook: ``output + delta`` (channel axis 1) in eval mode."""
    fn = module.__dict__.get(BIAS_DELTA)
    if fn is None or module.training or not isinstance(output, torch.Tensor):
        return output
    if not applies(module, output.dim()):
        return output
    delta = fn()
    if delta is None:
        return output
    shape = (1, -1) + (1,) * max(output.dim() - 2, 0) if output.dim() > 1 else (-1,)
    return output + delta.to(output.device, output.dtype).view(shape)


def set_bias_rounding(
    module: nn.Module, delta: Callable[[], torch.Tensor | None], linear: bool = False
) -> None:
    """Add ``delta()`` (per channel, axis 1) to ``module``'s eval-mode output, before any
    hook already on it (an output quantizer must see the rounded values). ``linear``:
    ``module`` is a Linear layer itself (see :func:`applies`).

    Example:
        >>> bn = nn.BatchNorm1d(1).eval()
        >>> set_bias_rounding(bn, lambda: torch.tensor([1.0]))
        >>> bn(torch.zeros(2, 1)).flatten().tolist()
        [1.0, 1.0]
    """
    module.__dict__[BIAS_DELTA] = delta
    module.__dict__[LINEAR_OUTPUT] = linear
    if _add_delta not in module._forward_hooks.values():
        module.register_forward_hook(_add_delta, prepend=True)


def remove_bias_rounding(model: nn.Module) -> int:
    """Remove every bias rounding hook from ``model``; returns how many.

    Example:
        >>> remove_bias_rounding(nn.Sequential(nn.ReLU()))
        0
    """
    removed = 0
    for m in model.modules():
        for key, fn in list(m._forward_hooks.items()):
            if fn is _add_delta:
                del m._forward_hooks[key]
        m.__dict__.pop(LINEAR_OUTPUT, None)
        if m.__dict__.pop(BIAS_DELTA, None) is not None:
            removed += 1
    return removed


def bias_roundings(model: nn.Module) -> dict[str, Callable[[], torch.Tensor | None]]:
    """Module name -> its ``delta`` callable, for every module with a bias rounding.

    Example:
        >>> bias_roundings(nn.Sequential(nn.ReLU()))
        {}
    """
    return {n: m.__dict__[BIAS_DELTA] for n, m in model.named_modules() if BIAS_DELTA in m.__dict__}


def find_bias_targets(
    model: nn.Module,
    is_layer: Callable[[nn.Module], bool],
    is_norm: Callable[[nn.Module], bool],
    is_conv: Callable[[nn.Module], bool],
) -> dict[str, tuple[str, str | None]]:
    """``{target module: (layer, BatchNorm or None)}``: where each layer's rounding goes.

    A conv (called once) whose output's only user is a BatchNorm module (called once) is
    followed by it: the export folds that BatchNorm, and the correction goes after it.
    Otherwise (a Linear: the export folds no BatchNorm into it) the correction goes on
    the layer's own output. ``{}`` when ``torch.fx`` cannot trace the model (then no
    output quantizers exist either).

    Example:
        >>> net = nn.Sequential(nn.Conv1d(2, 2, 1), nn.BatchNorm1d(2))
        >>> conv = lambda m: isinstance(m, nn.Conv1d)
        >>> find_bias_targets(net, conv, lambda m: isinstance(m, nn.BatchNorm1d), conv)
        {'1': ('0', '1')}
    """
    tracer = CountingTracer(lambda m: is_layer(m) or is_norm(m) or isinstance(m, DDQQuantizer))
    try:
        graph = tracer.trace(model)
    except Exception:  # fx raises many types for untraceable control flow
        return {}
    modules = dict(model.named_modules())
    targets: dict[str, tuple[str, str | None]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not is_layer(modules.get(str(node.target), nn.Module())):
            continue
        layer = str(node.target)
        if tracer.calls.get(layer, 0) != 1:
            continue  # a layer called twice has no single output to correct
        users = list(node.users)
        if (
            is_conv(modules[layer])
            and len(users) == 1
            and users[0].op == "call_module"
            and is_norm(modules.get(str(users[0].target), nn.Module()))
            and tracer.calls.get(str(users[0].target), 0) == 1
        ):
            targets[str(users[0].target)] = (layer, str(users[0].target))
        else:
            targets[layer] = (layer, None)
    return targets


@torch.no_grad()
def _prepared_delta(layer: QuantLayer, bn: nn.Module | None) -> torch.Tensor | None:
    """``delta`` of a prepared layer from its current parameters (``None``: no integer
    kernel, so no rounding: the layer computes in float, or its input is not uniform)."""
    iq, wq = layer.input_quantizer, layer.weight_quantizer
    if not layer.quantize or iq is None or iq.mode != "uniform":
        return None
    if not (iq.enabled and wq.enabled) or iq.calibrating or not bool(iq.initialized):
        return None
    if bn is not None and bn.training:
        return None
    # The frozen step values, as ddq.deploy.freeze stores them (float32).
    x_scale = float(np.float32(iq.uniform_params()[0]))
    w_scale = float(np.float32(wq.uniform_params()[0])) if wq.mode == "uniform" else None
    scales = wq.channel_scales()
    step = integer_weight_step(wq.mode, w_scale, scales, wq.levels().float())
    affine = batchnorm_affine(bn) if bn is not None else None  # type: ignore[arg-type]
    bias = getattr(layer, "bias", None)
    return rounding_delta(bias, affine, step, x_scale)


def attach_bias_rounding(model: nn.Module) -> dict[str, str]:
    """Put the bias rounding on every quantized layer of a prepared ``model`` (called by
    ``ddq.prepare`` when ``DDQConfig.integer_graph`` is set); returns ``{target: layer}``.

    Example:
        >>> attach_bias_rounding(prepared_net)  # doctest: +SKIP
        {'1': '0'}
    """

    def is_conv(m: nn.Module) -> bool:
        kind = kind_of(m)
        return kind is not None and kind.is_conv

    targets = find_bias_targets(
        model,
        lambda m: isinstance(m, QuantLayer),
        lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm),
        is_conv,
    )
    for target, (layer, bn) in targets.items():
        delta = functools.partial(
            _prepared_delta,
            model.get_submodule(layer),
            None if bn is None else model.get_submodule(bn),
        )
        linear = bn is None and not is_conv(model.get_submodule(layer))
        set_bias_rounding(model.get_submodule(target), delta, linear)
    return {t: layer for t, (layer, _) in targets.items()}
