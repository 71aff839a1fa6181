"""Freeze a prepared DDQ model into its deployable form: packed indices, tables, manifest.

:func:`freeze` turns every quantized layer into a ``b``-bit packed index tensor plus its
tables (and, for a per-channel weight, one float32 scale per output channel), every
BatchNorm into a per-channel scale and bias, and keeps everything else as float tensors.
It returns the artifact's contents without writing anything: :mod:`ddq.deploy.artifact`
writes them, :mod:`ddq.deploy.reader` reads them back, and :mod:`ddq.deploy.onnx_export`
builds its graph from them.
"""

from __future__ import annotations

import copy
import itertools
import json
from typing import Any

import numpy as np
import torch
from torch import nn

# batchnorm_affine moved to conversion (the model rounds biases with it); re-exported here.
from ..conversion.bias_rounding import batchnorm_affine
from ..conversion.output_quantizers import output_quantizers
from ..conversion.prepare import state_of
from ..layers import QuantLayer, kind_of
from ..quantizer import DDQQuantizer
from .manifest import (
    BATCHNORM_KEY,
    OUTPUTS_KEY,
    TABLES_KEY,
    BatchNormSpec,
    LayerSpec,
    Manifest,
    QuantSpec,
    checksum,
    index_key,
)
from .packing import pack_bits

__all__ = [
    "activation_thresholds",
    "batchnorm_affine",
    "conv_params",
    "decode_weight",
    "freeze",
    "layer_type",
    "validate_arch",
]

_FLT_MAX = torch.finfo(torch.float32).max
# Float32 neighbours tried on each side of a threshold's seed before bisecting.
_WINDOW = 8


def _float_key(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 key with the same order (sign-magnitude bits to two's complement)."""
    bits = x.view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _from_key(k: torch.Tensor) -> torch.Tensor:
    bits = torch.where(k >= 0, k, (-k) | 0x80000000)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)
    return bits.to(torch.int32).view(torch.float32)


@torch.no_grad()
def activation_thresholds(quantizer: DDQQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen quantizer as ``2**b - 1`` thresholds and ``2**b`` levels.

    ``x`` maps to level ``j`` = the number of thresholds strictly below ``x``. Threshold
    ``j`` is the largest float32 that the trained quantizer sends to level ``j`` or lower,
    found by searching the float32 numbers with the quantizer itself as the oracle, so the
    thresholds reproduce the training-time forward bit for bit whatever its rounding. (They
    are the midpoints between the last fine level of block ``j`` and the first of block
    ``j + 1``, up to that rounding; those midpoints seed the search.)

    Example:
        >>> q = DDQQuantizer(max_bits=4, mode="uniform", signed=False)
        >>> q.set_bits(2); q.init_range(0.0, 3.0); _ = q.eval()
        >>> thresholds, table = activation_thresholds(q)
        >>> table, thresholds
        (tensor([0., 1., 2., 3.]), tensor([0.5000, 1.5000, 2.5000]))
    """
    table = quantizer.levels().to(torch.float32)
    n = table.numel()
    fine = quantizer.fine_levels().detach().to(torch.float32)
    m = fine.numel() // n
    seed = (fine[m - 1 : -1 : m] + fine[m::m]) * 0.5
    lowest, highest = _float_key(torch.tensor([-_FLT_MAX, _FLT_MAX]))
    rows = torch.arange(n - 1)

    def at_most_j(keys: torch.Tensor) -> torch.Tensor:
        target = table[:-1].view(-1, *([1] * (keys.dim() - 1)))
        return quantizer(_from_key(keys)) <= target

    # One call on a window of float32 neighbours of each seed usually brackets the exact
    # threshold (calls, not elements, are what cost); rows it misses fall back to bisection.
    window = _float_key(seed)[:, None] + torch.arange(-_WINDOW, _WINDOW + 1)
    window = window.clamp_(lowest, highest)
    ok = at_most_j(window)
    found = ok[:, 0] & ~ok[:, -1]
    last = window[rows, ok.sum(1).clamp(min=1) - 1]
    lo = torch.where(found, last, lowest)
    hi = torch.where(found, last + 1, highest)
    saturated = ~found & at_most_j(hi)  # tied top levels: nothing finite goes above j
    while bool((hi - lo > 1).any()):
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        below = at_most_j(mid)
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    thresholds = torch.where(saturated, torch.tensor(_FLT_MAX), _from_key(lo))
    if not bool((thresholds[1:] >= thresholds[:-1]).all()):
        raise RuntimeError(f"{quantizer._label()}: thresholds are not sorted (non-monotone)")
    return thresholds, table


def _quant_spec(q: DDQQuantizer, table: torch.Tensor) -> QuantSpec:
    signed, per_channel = bool(q.signed), q.channels is not None
    if q.mode != "uniform":
        return QuantSpec("adaptive", q.bits, signed, per_channel=per_channel)
    # Per-channel: the step of the normalised grid (a power of two); the channel's integer
    # step is that times its channel scale.
    scale, zero_point = q.uniform_params()
    scale = float(np.float32(scale))  # a float32 step times a power of two: exact
    grid = scale * (torch.arange(table.numel(), dtype=torch.float64) - zero_point)
    # The stored table is the trained float32 levels; the integer grid must describe the
    # same numbers, or an integer runtime would compute a different model.
    if not torch.allclose(table.double(), grid, rtol=1e-5, atol=1e-5 * scale):
        raise RuntimeError(f"{q._label()}: uniform levels are not scale * (j - zero_point)")
    return QuantSpec("uniform", q.bits, signed, scale, zero_point, per_channel)


def decode_weight(
    table: torch.Tensor, idx: torch.Tensor, channel_scales: torch.Tensor | None
) -> torch.Tensor:
    """The weight an artifact describes: ``table[idx]``, times ``channel_scales[c]`` on axis 0.

    One float32 multiply per element, as in the trained quantizer, so the result is the
    fake-quantized weight bit for bit.

    Example:
        >>> decode_weight(torch.tensor([-1.0, 1.0]), torch.tensor([[0, 1], [1, 1]]),
        ...               torch.tensor([0.5, 2.0]))
        tensor([[-0.5000,  0.5000],
                [ 2.0000,  2.0000]])
    """
    w = table[idx.long()]
    if channel_scales is None:
        return w
    return w * channel_scales.view(-1, *([1] * (idx.dim() - 1)))


def _weight_indices(
    name: str,
    q: DDQQuantizer,
    weight: torch.Tensor,
    values: torch.Tensor,
    table: torch.Tensor,
    scales: torch.Tensor | None,
) -> torch.Tensor:
    """The level index of every weight element, checked to decode to ``values`` exactly."""
    idx = q.indices(weight)
    if not torch.equal(decode_weight(table, idx, scales), values):
        # Ties between equal levels, or a rounding the index search saw differently: look
        # the exact quantized values up among the exact decoded levels instead.
        n = table.numel()
        if scales is None:
            idx = torch.searchsorted(table, values.reshape(-1)).clamp_(max=n - 1)
        else:
            rows = table[None, :] * scales[:, None]  # (C, L): every channel's exact levels
            idx = torch.searchsorted(rows, values.reshape(scales.numel(), -1)).clamp_(max=n - 1)
        idx = idx.view(weight.shape)
        if not torch.equal(decode_weight(table, idx, scales), values):
            kind = (
                "table levels times their channel scale" if scales is not None else "table levels"
            )
            raise RuntimeError(f"layer {name!r}: quantized weights are not all {kind}")
    return idx


def _check_quantizer(q: DDQQuantizer | None, what: str) -> None:
    if q is None:
        return
    if not q.enabled or q.calibrating:
        raise ValueError(f"{what} is disabled or still calibrating; finish calibration first")
    if not bool(q.initialized):
        raise ValueError(
            f"{what} was never initialised: calibrate the model (ddq.calibrate) before export"
        )


def layer_type(m: nn.Module) -> str:
    """The manifest's type name of ``m`` (its row of ``LAYER_KINDS``)."""
    kind = kind_of(m)
    if kind is None:
        raise ValueError(f"unsupported quantized layer type {type(m).__name__}")
    return kind.name


def conv_params(m: nn.Module) -> dict[str, Any] | None:
    """All five conv settings as the manifest spells them (``None`` for ``Linear``)."""
    kind = kind_of(m)
    if kind is None or not kind.is_conv:
        return None
    padding = m.padding if isinstance(m.padding, str) else list(m.padding)
    return {
        "stride": list(m.stride),
        "padding": padding,
        "dilation": list(m.dilation),
        "groups": m.groups,
        "padding_mode": m.padding_mode,
    }


def _freeze_layer(
    name: str, layer: QuantLayer, offset: int, tensors: dict[str, torch.Tensor]
) -> tuple[LayerSpec, list[torch.Tensor]]:
    """Add the layer's packed indices to ``tensors``; return its spec and table parts."""
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    _check_quantizer(wq, f"layer {name!r}: weight quantizer")
    _check_quantizer(iq, f"layer {name!r}: input quantizer")
    weight: torch.Tensor = layer.weight.detach()
    if weight.dtype != torch.float32:
        raise ValueError(f"layer {name!r}: export supports float32 models, got {weight.dtype}")
    # The forward first: a weight quantizer re-fits itself when its bitwidth moved, and
    # the table and scales must be the ones that produced these values.
    values = wq(weight)
    table = wq.levels().to(torch.float32)
    scales = wq.channel_scales()
    if scales is not None and (
        scales.shape != (weight.shape[0],)
        or not bool((torch.isfinite(scales) & (scales > 0)).all())
    ):
        raise RuntimeError(
            f"layer {name!r}: weight quantizer's channel scales are not {weight.shape[0]} "
            "finite positive numbers"
        )
    idx = _weight_indices(name, wq, weight, values, table, scales)
    tensors[index_key(name)] = pack_bits(idx, wq.bits)
    parts = [table] if scales is None else [table, scales.to(torch.float32)]
    input_spec = None
    if iq is not None:
        thresholds, in_table = activation_thresholds(iq)
        parts += [thresholds, in_table]
        input_spec = _quant_spec(iq, in_table)
    bias = getattr(layer, "bias", None)
    if bias is not None:
        parts.append(bias.detach().float())
    spec = LayerSpec(
        type=layer_type(layer),
        weight_shape=tuple(weight.shape),
        bias=bias is not None,
        weight=_quant_spec(wq, table),
        input=input_spec,
        offset=offset,
        conv=conv_params(layer),
    )
    return spec, parts


def _is_frozen_bn(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
        and m.running_var is not None
    )


def validate_arch(arch: Any) -> dict[str, Any] | None:
    if arch is None:
        return None
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise ValueError(
            f"arch must be None or a dict {{'name': str, 'kwargs': dict}}, got {arch!r}"
        )
    kwargs = arch.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ValueError(f"arch['kwargs'] must be a dict, got {kwargs!r}")
    try:
        json.dumps(kwargs)
    except TypeError as e:
        raise ValueError(f"arch['kwargs'] must be JSON-serialisable: {e}") from e
    return {"name": arch["name"], "kwargs": kwargs}


@torch.no_grad()
def freeze(
    model: nn.Module, arch: dict[str, Any] | None = None
) -> tuple[Manifest, dict[str, torch.Tensor], dict[str, float]]:
    """The artifact's contents for a prepared, calibrated model, without writing a file.

    Returns:
        ``(manifest, tensors, sizes)``; ``sizes`` has ``fp32_bytes``,
        ``theoretical_bytes``, ``quantized_params`` and ``weight_bits`` (``sum(n * b)``).
        ``tensors`` hold one ``L.weight.idx`` per layer (``manifest.stored_tensors`` gives
        the file's form) and the manifest's checksums, of that form, are filled in.

    Example:
        >>> manifest, tensors, sizes = freeze(prepared_model)  # doctest: +SKIP
    """
    from .. import __version__

    state = state_of(model)
    arch = validate_arch(arch if arch is not None else getattr(model, "ddq_arch", None))
    if any(t.device.type != "cpu" for t in itertools.chain(model.parameters(), model.buffers())):
        # The artifact is CPU data; a CPU copy keeps every probe below on one device.
        model = copy.deepcopy(model).cpu()
    was_training = model.training
    model.eval()
    try:
        quantizer_prefixes = [  # a quantizer shared by two owners (integer_graph) twice
            n + "."
            for n, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, DDQQuantizer)
        ]
        tensors: dict[str, torch.Tensor] = {}
        layers: dict[str, LayerSpec] = {}
        batchnorm: dict[str, BatchNormSpec] = {}
        table_parts: list[torch.Tensor] = []
        affine_parts: list[torch.Tensor] = []
        consumed: list[str] = []  # module prefixes whose state is stored in ddq form
        n_tables = n_channels = n_params = weight_bits = 0
        for name, m in model.named_modules():
            if isinstance(m, QuantLayer) and m.quantize:
                spec, parts = _freeze_layer(name, m, n_tables, tensors)
                layers[name] = spec
                table_parts += parts
                n_tables += spec.tables_len
                n_params += spec.numel
                weight_bits += spec.numel * spec.weight.bits
                consumed.append(name + ".")
            elif _is_frozen_bn(m):
                affine_parts.append(torch.stack(batchnorm_affine(m)))
                batchnorm[name] = BatchNormSpec(m.num_features, n_channels)
                n_channels += m.num_features
                consumed.append(name + ".")
        if table_parts:
            tensors[TABLES_KEY] = torch.cat(table_parts)
        # integer_graph's output quantizers: thresholds and levels, like an input's.
        outputs: dict[str, QuantSpec] = {}
        output_parts: list[torch.Tensor] = []
        for name, q in output_quantizers(model).items():
            _check_quantizer(q, f"output quantizer of {name!r}")
            thresholds, levels = activation_thresholds(q)
            outputs[name] = _quant_spec(q, levels)
            output_parts += [thresholds, levels]
            n_tables += thresholds.numel() + levels.numel()
        if output_parts:
            tensors[OUTPUTS_KEY] = torch.cat(output_parts)
        if affine_parts:
            tensors[BATCHNORM_KEY] = torch.cat(affine_parts, dim=1)
        # The theoretical size: b bits per weight, 4 bytes per table entry (levels,
        # per-channel weight scales, thresholds, biases), BatchNorm scale and bias, and
        # every float tensor at its own width.
        theory = weight_bits / 8 + 4 * n_tables + 8 * n_channels
        sd = model.state_dict()
        # What the float model weighs at 4 bytes per floating-point state-dict element.
        fp32_bytes = 4 * sum(
            t.numel()
            for k, t in sd.items()
            if t.is_floating_point() and not k.startswith(tuple(quantizer_prefixes))
        )
        float_names = [k for k in sd if not k.startswith(tuple(consumed + quantizer_prefixes))]
        for k in float_names:
            if k in tensors:
                raise ValueError(f"float tensor {k!r} collides with a ddq tensor name")
            # clone: safetensors refuses tensors that share storage (tied weights).
            tensors[k] = sd[k].detach().cpu().contiguous().clone()
            theory += tensors[k].numel() * tensors[k].element_size()
    finally:
        model.train(was_training)
    manifest = Manifest(
        architecture=arch,
        conventions=state.conventions(),
        layers=layers,
        batchnorm=batchnorm,
        float_tensors=float_names,
        producer=f"ddq {__version__}",
        outputs=outputs,
    )
    manifest.checksums = {k: checksum(t) for k, t in manifest.stored_tensors(tensors).items()}
    sizes = {
        "fp32_bytes": fp32_bytes,
        "theoretical_bytes": theory,
        "quantized_params": n_params,
        "weight_bits": weight_bits,
    }
    return manifest, tensors, sizes
