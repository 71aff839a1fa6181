"""The manifest of a ddq artifact: schema, format version, validation and checksums.

A ddq artifact is one safetensors file. Its tensors hold the numbers; the JSON manifest,
stored in the safetensors metadata under :data:`MANIFEST_KEY`, says what they mean.

Format version 3 (:data:`FORMAT_VERSION`; versions 1 and 2 are still read, see the end).
Tensors (``L`` a quantized layer's module name):

* ``ddq.indices`` -- uint8, 1-D: every quantized layer's ``b``-bit weight level indices,
  packed at exactly ``b`` bits per element (:mod:`ddq.deploy.packing`: flat row-major
  order, little-endian bit stream, ``ceil(n * b / 8)`` bytes per layer), the layers one
  after the other in manifest order, each starting on a byte.
* ``ddq.tables`` -- float32, 1-D: every quantized layer's small float parts, one slice per
  layer, in manifest order: the weight's ``2**b_w`` sorted levels; then, for a per-channel
  weight, its ``out_channels`` channel scales (all finite and > 0); then, when the input
  is quantized, the input quantizer's ``2**b_a - 1`` sorted thresholds and its ``2**b_a``
  levels; then the bias (``out_channels`` values) if the layer has one. An input ``x``
  becomes level ``j`` = the number of thresholds strictly below ``x``.
* ``ddq.batchnorm`` -- float32 ``(2, sum C)``: every BatchNorm as a per-channel scale
  (row 0) and bias (row 1), ``y = x * scale + bias``, in manifest order.
* ``ddq.outputs`` -- float32, 1-D, only when the model has output quantizers
  (``DDQConfig.integer_graph``): each one's ``2**b - 1`` thresholds then ``2**b`` levels,
  in the order of the manifest's ``"o"``.
* every other entry of the model's state dict (layers ddq left float, LayerNorm, ...)
  under its own name and dtype.

The small parts share three tensors because each safetensors entry costs about 80 bytes
of header and each checksum 16: a small model's file is within 5% of its theoretical size
plus about 1.5 KB.

Manifest (compact JSON, no spaces; short keys; defaults and derivable values left out)::

    {"format": "ddq-artifact", "format_version": 3, "p": "ddq 0.1.0",   # producer
     "a": {"name": "mobilenet_v2", "kwargs": {...}},   # architecture; absent: none
     "c": {"first_layer": ..., "last_layer": ...},     # conventions that differ from
                                                       # CONVENTIONS_BASELINE ("C": all)
     "d": {"w": {quantizer fields}, "i": {...}},       # the layers' defaults: per field,
                                                       # the value most layers have
     "l": {L: {"s": [weight shape],                    # rank 2/3/4: Linear/Conv1d/Conv2d
               "b": true,                              # has a bias (absent: none)
               "w": {fields that differ from d.w},     # weight quantizer
               "i": {fields that differ from d.i},     # input quantizer; null: float
               "k": {"s": 2, "p": 1, "g": 32}}},       # non-default conv settings
     "n": {B: C},                                      # BatchNorms and their channels
     "o": {M: {quantizer fields}},                     # output quantizers (absent: none):
                                                       # module M's output is quantized
     "f": [names of the float tensors],
     "h": "16 hex digits of BLAKE2b-64 per stored tensor, concatenated"}

Quantizer fields: ``m`` mode (``"u"`` uniform, ``"a"`` adaptive), ``b`` bits, ``g``
signed, ``p`` per-channel (weights only), and for uniform mode ``s`` scale and ``z``
zero point. Conv settings: ``s`` stride, ``p`` padding, ``d`` dilation (one int when
every dimension is equal), ``g`` groups, ``m`` padding mode. Offsets are implied: each
layer's slices of ``ddq.indices`` and ``ddq.tables`` follow the previous layer's, each
BatchNorm's channels the previous BatchNorm's. The checksums follow the order of
:meth:`Manifest.expected_tensors` (``ddq.indices``, ``ddq.tables``, ``ddq.batchnorm``,
then the float tensors).

The manifest's own BLAKE2b-64 digest is stored under :data:`DIGEST_KEY`, so an edit of
either the tensors or the manifest is caught. A uniform quantizer's levels are
``scale * (j - zero_point)`` (``scale`` is a float32 value, written with the shortest
decimal that reads back to it); its table holds the same levels as the exact float32
numbers the trained model used, so both decoders reproduce the fake-quantized model.

Per-channel weights (``p`` true): the table holds one *normalised* set of levels for the
layer and the weight element ``w[c, ...]`` with index ``j`` is
``table[j] * channel_scales[c]`` (one float32 multiply, exactly what the trained model
computed). Bits and table stay per layer; only the scale is per output channel (axis 0).
In uniform mode ``scale`` is the normalised grid's step (a power of two) and the integer
step of channel ``c`` is ``scale * channel_scales[c]`` (exact), with ``zero_point`` shared
by every channel: per-channel affine integer quantization on axis 0.

Versions 1 and 2 (read, and written by ``Manifest.to_json(version)``) hold the same
numbers with one ``L.weight.idx`` tensor per layer and a longer manifest::

    {"format": "ddq-artifact", "format_version": 2, "producer": "ddq 0.1.0",
     "architecture": {...} or null, "conventions": {...},
     "layers": {L: {"type": "Conv2d", "weight_shape": [...], "bias": false, "offset": 0,
                    "conv": {"groups": 32, ...},          # only non-default conv settings
                    "weight": {"mode": "uniform", "bits": 4, "signed": true,
                               "per_channel": true,               # absent: per tensor
                               "scale": 16.0, "zero_point": 8},   # scale/zp: uniform only
                    "input": {...same fields, never per_channel...} or null}},
     "batchnorm": {B: {"channels": C, "offset": 0}},
     "float": [names of the float tensors],
     "checksums": {tensor name: 16 hex digits}}

Version 1 is version 2 without per-channel weights. In memory every version reads into the
same :class:`Manifest`, and :func:`ddq.deploy.reader.read_artifact` returns one
``L.weight.idx`` tensor per layer (:meth:`Manifest.split_tensors`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..layers.kinds import LAYER_KINDS
from .packing import packed_nbytes

__all__ = [
    "BATCHNORM_KEY",
    "CONVENTIONS_BASELINE",
    "DIGEST_KEY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDICES_KEY",
    "LAYER_TYPES",
    "MANIFEST_KEY",
    "OUTPUTS_KEY",
    "READ_VERSIONS",
    "TABLES_KEY",
    "BatchNormSpec",
    "LayerSpec",
    "Manifest",
    "QuantSpec",
    "checksum",
    "conv_defaults",
    "index_key",
]

FORMAT_NAME = "ddq-artifact"
FORMAT_VERSION = 3
# Versions this ddq reads: 1 (per-tensor weights only), 2 (adds per-channel weights) and 3
# (the same contents in a compact manifest); it writes 3 (and 2 or 1 on request).
READ_VERSIONS = (1, 2, 3)
MANIFEST_KEY = "ddq.manifest"
DIGEST_KEY = "ddq.manifest.blake2b"
TABLES_KEY = "ddq.tables"
BATCHNORM_KEY = "ddq.batchnorm"
# Version 3 stores every layer's packed indices in this one tensor, in layer order.
INDICES_KEY = "ddq.indices"
# Output quantizers (integer_graph): thresholds and levels, one after the other.
OUTPUTS_KEY = "ddq.outputs"
LAYER_TYPES = tuple(k.name for k in LAYER_KINDS)
_MODES = ("adaptive", "uniform")
_RANK = {k.name: k.weight_rank for k in LAYER_KINDS}
_TYPE_OF_RANK = {rank: kind for kind, rank in _RANK.items()}
# Version 3 stores only the conventions that differ from these (frozen with the format:
# ddq 0.1's defaults; first_layer and last_layer are always stored).
CONVENTIONS_BASELINE: dict[str, Any] = {
    "first_last_bits": 8,
    "network_input_quantized": True,
    "weights_signed": True,
    "weights_per_channel": True,
    "activations_signed": "auto (from calibration)",
    "activations_quantized": True,
    "bias_and_batchnorm": "float32 (BatchNorm folds into a per-channel epilogue)",
}
# Version 3's short names of the conv settings.
_CONV_KEYS = {
    "stride": "s",
    "padding": "p",
    "dilation": "d",
    "groups": "g",
    "padding_mode": "m",
}
_CONV_NAMES = {short: name for name, short in _CONV_KEYS.items()}
_HEX = 16  # hex digits of one checksum


def index_key(layer: str) -> str:
    """Tensor name of a layer's packed weight indices."""
    return f"{layer}.weight.idx"


def conv_defaults(dims: int) -> dict[str, Any]:
    """``nn.Conv{dims}d``'s default settings, as the manifest spells them."""
    return {
        "stride": [1] * dims,
        "padding": [0] * dims,
        "dilation": [1] * dims,
        "groups": 1,
        "padding_mode": "zeros",
    }


def checksum(data: torch.Tensor | bytes) -> str:
    """BLAKE2b-64 of a tensor's raw (little-endian, row-major) bytes, as 16 hex digits.

    64 bits are plenty to catch silent corruption (a random change slips through with
    probability 2**-64) and keep the manifest small.

    Example:
        >>> checksum(torch.zeros(3, dtype=torch.uint8))
        'a0db1feb5e9a7f45'
    """
    if isinstance(data, torch.Tensor):
        t = data.detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _fail(source: str, problem: str) -> ValueError:
    return ValueError(f"{source}: {problem}")


def _get(d: Any, key: str, kind: type | tuple[type, ...], source: str, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise _fail(source, f"manifest {where} lacks the field {key!r}")
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass: a JSON true must not pass as a bit count.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise _fail(source, f"manifest {where}.{key} has the wrong type: {value!r}")
    return value


def _count(d: Any, key: str, source: str, where: str, minimum: int) -> int:
    value = _get(d, key, int, source, where)
    if value < minimum:
        raise _fail(source, f"manifest {where}.{key} is {value}, expected >= {minimum}")
    return value


def _short_float32(x: float) -> float:
    """A float32 value as the double with the shortest decimal that reads back to it."""
    return float(str(np.float32(x)))


def _diff(d: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``d`` that ``default`` lacks or holds differently (type included:
    ``True`` is not ``1``)."""
    return {
        k: v
        for k, v in d.items()
        if k not in default or type(default[k]) is not type(v) or default[k] != v
    }


def _check_in_order(entries: Iterable[tuple[str, str, int, int]]) -> None:
    """Version 3 omits offsets: each ``(label, what, offset, length)`` slice must start
    where the previous one ended."""
    at = 0
    for label, what, offset, length in entries:
        if offset != at:
            raise ValueError(
                f"{label}: version 3 stores {what}; its slice starts at {offset}, not {at}"
            )
        at += length


def _most_common(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """Per key, the value most of ``dicts`` hold (first seen on a tie)."""
    counts: dict[str, dict[Any, int]] = {}
    for d in dicts:
        for k, v in d.items():
            key = (type(v), v)
            counts.setdefault(k, {})
            counts[k][key] = counts[k].get(key, 0) + 1
    return {k: max(c, key=c.__getitem__)[1] for k, c in counts.items()}


def _compact_conv(conv: dict[str, Any], dims: int) -> dict[str, Any]:
    """The non-default conv settings under short keys; a tuple of equal values as one."""
    out: dict[str, Any] = {}
    for name, value in _diff(conv, conv_defaults(dims)).items():
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]
        out[_CONV_KEYS.get(name, name)] = value
    return out


def _expand_conv(given: Any, dims: int, source: str, where: str) -> dict[str, Any]:
    """All five conv settings from :func:`_compact_conv`'s form, validated."""
    if not isinstance(given, dict):
        raise _fail(source, f"manifest {where} must be an object, got {given!r}")
    unknown = sorted(set(given) - set(_CONV_NAMES))
    if unknown:
        raise _fail(source, f"manifest {where} has unknown settings {unknown}")
    conv = conv_defaults(dims)
    for short, value in given.items():
        name = _CONV_NAMES[short]
        if name == "groups":
            value = _count(given, short, source, where, 1)
        elif name == "padding_mode" or (name == "padding" and isinstance(value, str)):
            value = _get(given, short, str, source, where)
        else:
            value = [value] * dims if isinstance(value, int) else value
            if not (
                isinstance(value, list)
                and len(value) == dims
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
            ):
                raise _fail(
                    source, f"manifest {where}.{short} must be an int or {dims} ints, got {value!r}"
                )
        conv[name] = value
    return conv


@dataclass(frozen=True)
class QuantSpec:
    """A frozen quantizer: ``2**bits`` levels; uniform mode adds ``scale``/``zero_point``.

    ``per_channel`` (weights only): the levels are normalised and each output channel has
    its own scale (stored in ``ddq.tables``); in uniform mode ``scale`` is then the
    normalised step and channel ``c``'s integer step is ``scale * channel_scales[c]``.

    Example:
        >>> QuantSpec("uniform", 4, True, 0.1, 8).levels
        16
    """

    mode: str
    bits: int
    signed: bool
    scale: float | None = None
    zero_point: int | None = None
    per_channel: bool = False

    @property
    def levels(self) -> int:
        """Number of levels, ``2**bits``."""
        return 2**self.bits

    def to_dict(self, short: bool = False) -> dict[str, Any]:
        """The manifest's form: long keys (versions 1 and 2) or short ones (version 3,
        ``m b g p s z`` for mode, bits, signed, per_channel, scale, zero_point, with mode
        ``"a"`` or ``"u"`` and ``p`` always written)."""
        k = _SHORT_KEYS if short else _LONG_KEYS
        mode = self.mode[0] if short else self.mode
        d: dict[str, Any] = {k["mode"]: mode, k["bits"]: self.bits, k["signed"]: self.signed}
        if self.per_channel or short:
            d[k["per_channel"]] = self.per_channel
        if self.mode == "uniform":
            assert self.scale is not None
            d[k["scale"]], d[k["zero_point"]] = _short_float32(self.scale), self.zero_point
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str, where: str, short: bool = False) -> QuantSpec:
        """Parse and validate :meth:`to_dict`'s form; errors name ``source`` and ``where``."""
        k = _SHORT_KEYS if short else _LONG_KEYS
        modes = tuple(m[0] for m in _MODES) if short else _MODES
        mode = _get(d, k["mode"], str, source, where)
        if mode not in modes:
            raise _fail(
                source, f"manifest {where}.{k['mode']} is {mode!r}, expected one of {modes}"
            )
        mode = _MODES[modes.index(mode)]
        bits = _get(d, k["bits"], int, source, where)
        if not 1 <= bits <= 8:
            raise _fail(source, f"manifest {where}.{k['bits']} is {bits}, expected 1..8")
        signed = _get(d, k["signed"], bool, source, where)
        per_channel = False
        if k["per_channel"] in d:
            per_channel = _get(d, k["per_channel"], bool, source, where)
        if mode == "adaptive":
            return cls(mode, bits, signed, per_channel=per_channel)
        scale = float(np.float32(_get(d, k["scale"], (int, float), source, where)))
        zero_point = _get(d, k["zero_point"], int, source, where)
        if not (math.isfinite(scale) and scale > 0):
            raise _fail(
                source, f"manifest {where}.{k['scale']} must be finite and > 0, got {scale}"
            )
        if not 0 <= zero_point < 2**bits:
            raise _fail(
                source,
                f"manifest {where}.{k['zero_point']} {zero_point} is not in 0..2**bits-1",
            )
        return cls(mode, bits, signed, scale, zero_point, per_channel)


_LONG_KEYS = {f: f for f in ("mode", "bits", "signed", "per_channel", "scale", "zero_point")}
_SHORT_KEYS = dict(zip(_LONG_KEYS, "mbgpsz", strict=True))


@dataclass(frozen=True)
class LayerSpec:
    """One quantized ``Conv1d``/``Conv2d``/``Linear`` layer of the artifact.

    ``conv`` holds all five conv settings (``stride``, ``padding``, ``dilation``,
    ``groups``, ``padding_mode``); ``offset`` is where the layer's slice of
    ``ddq.tables`` starts.
    """

    type: str
    weight_shape: tuple[int, ...]
    bias: bool
    weight: QuantSpec
    input: QuantSpec | None
    offset: int = 0
    conv: dict[str, Any] | None = None

    @property
    def numel(self) -> int:
        """Number of weight elements."""
        return math.prod(self.weight_shape)

    @property
    def channels(self) -> int:
        """Number of output channels (axis 0 of the weight)."""
        return self.weight_shape[0]

    @property
    def tables_len(self) -> int:
        """Length of the layer's slice of ``ddq.tables``."""
        n = self.weight.levels + (self.channels if self.weight.per_channel else 0)
        if self.input is not None:
            n += 2 * self.input.levels - 1
        return n + (self.weight_shape[0] if self.bias else 0)

    def split_tables(self, tables: torch.Tensor) -> dict[str, torch.Tensor]:
        """This layer's parts of ``ddq.tables``: ``weight_table`` and, where present,
        ``channel_scales``, ``thresholds``, ``input_table``, ``bias`` (views)."""
        parts = {}
        at = self.offset
        for name, n, present in (
            ("weight_table", self.weight.levels, True),
            ("channel_scales", self.channels, self.weight.per_channel),
            ("thresholds", self.input.levels - 1 if self.input else 0, self.input is not None),
            ("input_table", self.input.levels if self.input else 0, self.input is not None),
            ("bias", self.weight_shape[0], self.bias),
        ):
            if present:
                parts[name] = tables[at : at + n]
                at += n
        return parts

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": self.type,
            "weight_shape": list(self.weight_shape),
            "bias": self.bias,
            "offset": self.offset,
            "weight": self.weight.to_dict(),
            "input": None if self.input is None else self.input.to_dict(),
        }
        if self.conv is not None:
            defaults = conv_defaults(len(self.weight_shape) - 2)
            d["conv"] = {k: v for k, v in self.conv.items() if defaults.get(k) != v}
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str, where: str) -> LayerSpec:
        kind = _get(d, "type", str, source, where)
        if kind not in LAYER_TYPES:
            raise _fail(source, f"manifest {where}.type is {kind!r}, expected one of {LAYER_TYPES}")
        shape = _get(d, "weight_shape", list, source, where)
        if len(shape) != _RANK[kind] or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
        ):
            raise _fail(source, f"manifest {where}.weight_shape {shape} is not a {kind} shape")
        conv = None
        if kind != "Linear":
            given = _get(d, "conv", dict, source, where)
            conv = conv_defaults(_RANK[kind] - 2)
            unknown = sorted(set(given) - set(conv))
            if unknown:
                raise _fail(source, f"manifest {where}.conv has unknown settings {unknown}")
            conv.update(given)
        raw_input = d.get("input")
        input_spec = (
            None if raw_input is None else QuantSpec.from_dict(raw_input, source, f"{where}.input")
        )
        if input_spec is not None and input_spec.per_channel:
            raise _fail(source, f"manifest {where}.input: activations are never per_channel")
        return cls(
            type=kind,
            weight_shape=tuple(shape),
            bias=_get(d, "bias", bool, source, where),
            weight=QuantSpec.from_dict(d.get("weight"), source, f"{where}.weight"),
            input=input_spec,
            offset=_count(d, "offset", source, where, 0),
            conv=conv,
        )

    def to_compact(self, w_default: dict[str, Any], i_default: dict[str, Any] | None) -> dict:
        """Version 3's form: ``s`` weight shape (the type follows from its rank), ``b``
        bias (only when true), ``w``/``i`` the quantizer fields that differ from the
        manifest's defaults (``i: null``: a float input), ``k`` the non-default conv
        settings. The offset is implied by the layer order."""
        d: dict[str, Any] = {"s": list(self.weight_shape)}
        if self.bias:
            d["b"] = True
        w = _diff(self.weight.to_dict(short=True), w_default)
        if w:
            d["w"] = w
        if self.input is None:
            if i_default is not None:
                d["i"] = None
        else:
            i = _diff(self.input.to_dict(short=True), i_default or {})
            if i:
                d["i"] = i
        if self.conv is not None:
            k = _compact_conv(self.conv, len(self.weight_shape) - 2)
            if k:
                d["k"] = k
        return d

    @classmethod
    def from_compact(
        cls,
        d: Any,
        w_default: dict[str, Any],
        i_default: dict[str, Any] | None,
        offset: int,
        source: str,
        where: str,
    ) -> LayerSpec:
        """Parse and validate :meth:`to_compact`'s form."""
        if not isinstance(d, dict):
            raise _fail(source, f"manifest {where} must be an object, got {d!r}")
        unknown = sorted(set(d) - {"s", "b", "w", "i", "k"})
        if unknown:
            raise _fail(source, f"manifest {where} has unknown fields {unknown}")
        shape = _get(d, "s", list, source, where)
        kind = _TYPE_OF_RANK.get(len(shape))
        if kind is None or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape
        ):
            raise _fail(
                source, f"manifest {where}.s {shape} is not a Conv1d, Conv2d or Linear weight shape"
            )
        bias = _get(d, "b", bool, source, where) if "b" in d else False
        raw_w = d.get("w", {})
        if not isinstance(raw_w, dict):
            raise _fail(source, f"manifest {where}.w must be an object, got {raw_w!r}")
        weight = QuantSpec.from_dict({**w_default, **raw_w}, source, f"{where}.w", short=True)
        raw_i = d.get("i", {} if i_default is not None else None)
        input_spec = None
        if raw_i is not None:
            if not isinstance(raw_i, dict):
                raise _fail(source, f"manifest {where}.i must be an object or null, got {raw_i!r}")
            merged = {**(i_default or {}), **raw_i}
            input_spec = QuantSpec.from_dict(merged, source, f"{where}.i", short=True)
            if input_spec.per_channel:
                raise _fail(source, f"manifest {where}.i: activations are never per_channel")
        conv = None
        if kind == "Linear":
            if "k" in d:
                raise _fail(source, f"manifest {where}: a Linear layer has no conv settings")
        else:
            conv = _expand_conv(d.get("k", {}), len(shape) - 2, source, f"{where}.k")
        return cls(kind, tuple(shape), bias, weight, input_spec, offset, conv)


@dataclass(frozen=True)
class BatchNormSpec:
    """A BatchNorm of ``channels`` channels, at ``offset`` in ``ddq.batchnorm``."""

    channels: int
    offset: int

    def split(self, affine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, bias)`` of this BatchNorm from the ``(2, sum C)`` tensor (views)."""
        part = affine[:, self.offset : self.offset + self.channels]
        return part[0], part[1]


def _check_tiling(spans: list[tuple[int, int, str]], total: int, what: str, source: str) -> None:
    """The ``(offset, length, owner)`` slices must cover ``0..total`` exactly once."""
    at = 0
    for offset, length, owner in sorted(spans):
        if offset != at:
            raise _fail(
                source,
                f"manifest and tensors disagree: {what} slice of {owner!r} starts at {offset}, "
                f"expected {at} (slices overlap or leave gaps)",
            )
        at += length
    if at != total:
        raise _fail(
            source, f"manifest and tensors disagree: {what} slices end at {at}, not {total}"
        )


@dataclass
class Manifest:
    """Everything in an artifact except the tensor data (see the module docstring).

    Example:
        >>> m = Manifest(architecture=None, conventions={}, layers={}, batchnorm={},
        ...              float_tensors=["fc.weight"], checksums={"fc.weight": "0" * 16})
        >>> Manifest.from_json(m.to_json(), "demo").float_tensors
        ['fc.weight']
    """

    architecture: dict[str, Any] | None
    conventions: dict[str, Any]
    layers: dict[str, LayerSpec]
    batchnorm: dict[str, BatchNormSpec]
    float_tensors: list[str]
    checksums: dict[str, str] = field(default_factory=dict)
    producer: str = "ddq"
    format_version: int = FORMAT_VERSION
    #: output quantizers (``integer_graph``): module name -> its output's quantizer
    outputs: dict[str, QuantSpec] = field(default_factory=dict)

    def split_outputs(self, values: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``ddq.outputs`` as ``{module: (thresholds, levels)}`` (views), in manifest order."""
        out, at = {}, 0
        for name, spec in self.outputs.items():
            n = spec.levels
            out[name] = (values[at : at + n - 1], values[at + n - 1 : at + 2 * n - 1])
            at += 2 * n - 1
        return out

    def to_json(self, version: int = FORMAT_VERSION) -> str:
        """Compact JSON (no spaces: the manifest is part of the artifact's size).

        ``version`` 3 (the default) is the compact form; 2 and 1 write the older
        layout (1 only describes per-tensor weights), for tools that read only those.
        """
        if version not in READ_VERSIONS:
            raise ValueError(f"cannot write manifest version {version}; one of {READ_VERSIONS}")
        d = self._to_v3() if version >= 3 else self._to_v2(version)
        return json.dumps(d, separators=(",", ":"), allow_nan=False)

    def _to_v2(self, version: int) -> dict[str, Any]:
        if self.outputs:
            raise ValueError(
                f"manifest version {version} cannot describe output quantizers "
                "(integer_graph); write version 3"
            )
        return {
            "format": FORMAT_NAME,
            "format_version": version,
            "producer": self.producer,
            "architecture": self.architecture,
            "conventions": self.conventions,
            "layers": {name: spec.to_dict() for name, spec in self.layers.items()},
            "batchnorm": {
                n: {"channels": b.channels, "offset": b.offset} for n, b in self.batchnorm.items()
            },
            "float": self.float_tensors,
            "checksums": self.checksums,
        }

    def _to_v3(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT_NAME, "format_version": 3, "p": self.producer}
        if self.architecture is not None:
            d["a"] = self.architecture
        if set(CONVENTIONS_BASELINE) <= set(self.conventions):
            c = _diff(self.conventions, CONVENTIONS_BASELINE)
            if c:
                d["c"] = c
        else:  # not the usual set of conventions: all of them
            d["C"] = self.conventions
        _check_in_order(
            (f"layer {n!r}", "the tables in layer order", s.offset, s.tables_len)
            for n, s in self.layers.items()
        )
        if self.layers:
            specs = self.layers.values()
            w_default = _most_common([s.weight.to_dict(short=True) for s in specs])
            inputs = [s.input.to_dict(short=True) for s in specs if s.input is not None]
            i_default = _most_common(inputs) if inputs else None
            d["d"] = {"w": w_default} if i_default is None else {"w": w_default, "i": i_default}
            d["l"] = {n: s.to_compact(w_default, i_default) for n, s in self.layers.items()}
        if self.batchnorm:
            _check_in_order(
                (f"BatchNorm {n!r}", "the BatchNorms in order", b.offset, b.channels)
                for n, b in self.batchnorm.items()
            )
            d["n"] = {n: b.channels for n, b in self.batchnorm.items()}
        if self.outputs:
            d["o"] = {n: q.to_dict(short=True) for n, q in self.outputs.items()}
        if self.float_tensors:
            d["f"] = self.float_tensors
        names = list(self.expected_tensors(3))
        if set(self.checksums) != set(names) or not all(
            len(self.checksums[n]) == _HEX for n in names
        ):
            raise ValueError("the checksums must be 16 hex digits for every tensor")
        d["h"] = "".join(self.checksums[n] for n in names)
        return d

    @classmethod
    def from_json(cls, text: str, source: str) -> Manifest:
        """Parse and validate; every problem is a ``ValueError`` naming ``source``."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise _fail(source, f"the manifest is not valid JSON ({e})") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise _fail(source, f"not a ddq artifact (manifest format is not {FORMAT_NAME!r})")
        version = d.get("format_version")
        if isinstance(version, bool) or version not in READ_VERSIONS:
            raise _fail(
                source,
                f"unknown artifact format version {version!r}; this ddq reads versions "
                f"{', '.join(map(str, READ_VERSIONS))} (re-export the model with this ddq, "
                "or upgrade ddq)",
            )
        if version >= 3:
            return cls._from_v3(d, source)
        return cls._from_v2(d, version, source)

    @staticmethod
    def _check_arch(arch: Any, source: str) -> None:
        if arch is not None and (
            not isinstance(arch, dict)
            or not isinstance(arch.get("name"), str)
            or not isinstance(arch.get("kwargs", {}), dict)
        ):
            raise _fail(source, f"manifest architecture must be {{name, kwargs}}, got {arch!r}")

    @classmethod
    def _from_v3(cls, d: dict[str, Any], source: str) -> Manifest:
        unknown = sorted(
            set(d) - {"format", "format_version", "p", "a", "c", "C", "d", "l", "n", "o", "f", "h"}
        )
        if unknown:
            raise _fail(source, f"manifest has unknown fields {unknown}")
        arch = d.get("a")
        cls._check_arch(arch, source)
        if "C" in d:
            conventions = _get(d, "C", dict, source, "root")
        else:
            conventions = {
                **CONVENTIONS_BASELINE,
                **(_get(d, "c", dict, source, "root") if "c" in d else {}),
            }
        defaults = _get(d, "d", dict, source, "root") if "d" in d else {}
        w_default = _get(defaults, "w", dict, source, "d") if "w" in defaults else {}
        i_default = _get(defaults, "i", dict, source, "d") if "i" in defaults else None
        raw_layers = _get(d, "l", dict, source, "root") if "l" in d else {}
        layers: dict[str, LayerSpec] = {}
        at = 0
        for name, raw in raw_layers.items():
            spec = LayerSpec.from_compact(raw, w_default, i_default, at, source, f"l[{name!r}]")
            layers[name] = spec
            at += spec.tables_len
        raw_bn = _get(d, "n", dict, source, "root") if "n" in d else {}
        batchnorm: dict[str, BatchNormSpec] = {}
        at = 0
        for name in raw_bn:
            channels = _count(raw_bn, name, source, "n", 1)
            batchnorm[name] = BatchNormSpec(channels, at)
            at += channels
        raw_out = _get(d, "o", dict, source, "root") if "o" in d else {}
        outputs = {
            n: QuantSpec.from_dict(q, source, f"o[{n!r}]", short=True) for n, q in raw_out.items()
        }
        if any(q.per_channel for q in outputs.values()):
            raise _fail(source, "manifest output quantizers cannot be per-channel")
        floats = _get(d, "f", list, source, "root") if "f" in d else []
        if not all(isinstance(v, str) for v in floats):
            raise _fail(source, "manifest float names must be strings")
        manifest = cls(
            outputs=outputs,
            architecture=arch,
            conventions=conventions,
            layers=layers,
            batchnorm=batchnorm,
            float_tensors=list(floats),
            producer=str(d.get("p", "")),
            format_version=3,
        )
        try:
            names = list(manifest.expected_tensors())
        except ValueError as e:
            raise _fail(source, f"manifest and tensors disagree: {e}") from e
        digests = _get(d, "h", str, source, "root")
        if len(digests) != _HEX * len(names):
            raise _fail(
                source,
                f"manifest and tensors disagree: checksums do not cover every tensor "
                f"({len(digests) / _HEX:g} checksums for {len(names)} tensors)",
            )
        if digests.strip("0123456789abcdef"):
            raise _fail(source, "manifest checksums must be lowercase hex digits")
        manifest.checksums = {n: digests[i * _HEX : (i + 1) * _HEX] for i, n in enumerate(names)}
        return manifest

    @classmethod
    def _from_v2(cls, d: dict[str, Any], version: int, source: str) -> Manifest:
        arch = d.get("architecture")
        cls._check_arch(arch, source)
        layers = _get(d, "layers", dict, source, "root")
        batchnorm = _get(d, "batchnorm", dict, source, "root")
        floats = _get(d, "float", list, source, "root")
        checksums = _get(d, "checksums", dict, source, "root")
        if not all(isinstance(v, str) for v in [*floats, *checksums.values()]):
            raise _fail(source, "manifest float names and checksums must be strings")
        specs = {n: LayerSpec.from_dict(s, source, f"layers[{n!r}]") for n, s in layers.items()}
        if version < 2:
            per_channel = [n for n, s in specs.items() if s.weight.per_channel]
            if per_channel:
                raise _fail(
                    source,
                    f"manifest format version {version} has no per-channel weights, but "
                    f"layers {per_channel[:5]} say per_channel",
                )
        return cls(
            architecture=arch,
            conventions=_get(d, "conventions", dict, source, "root"),
            layers=specs,
            batchnorm={
                n: BatchNormSpec(
                    _count(b, "channels", source, f"batchnorm[{n!r}]", 1),
                    _count(b, "offset", source, f"batchnorm[{n!r}]", 0),
                )
                for n, b in batchnorm.items()
            },
            float_tensors=list(floats),
            checksums=dict(checksums),
            producer=str(d.get("producer", "")),
            format_version=version,
        )

    def expected_tensors(
        self, version: int | None = None
    ) -> dict[str, tuple[torch.dtype, tuple[int, ...]] | None]:
        """Stored tensor name -> (dtype, shape) the manifest implies (``None``: float
        tensors), in the order of version 3's checksums; ``version`` defaults to the
        manifest's own (3: one ``ddq.indices`` tensor, else one per layer)."""
        version = self.format_version if version is None else version
        out: dict[str, tuple[torch.dtype, tuple[int, ...]] | None] = {}
        nbytes = {n: packed_nbytes(s.numel, s.weight.bits) for n, s in self.layers.items()}
        if version >= 3 and self.layers:
            out[INDICES_KEY] = (torch.uint8, (sum(nbytes.values()),))
        else:
            out.update({index_key(n): (torch.uint8, (nb,)) for n, nb in nbytes.items()})
        if self.layers:
            total = sum(s.tables_len for s in self.layers.values())
            out[TABLES_KEY] = (torch.float32, (total,))
        if self.batchnorm:
            out[BATCHNORM_KEY] = (
                torch.float32,
                (2, sum(b.channels for b in self.batchnorm.values())),
            )
        if self.outputs:
            total = sum(2 * q.levels - 1 for q in self.outputs.values())
            out[OUTPUTS_KEY] = (torch.float32, (total,))
        reserved = set(out) | {index_key(n) for n in self.layers}
        for name in self.float_tensors:
            if name in reserved:
                raise ValueError(f"float tensor {name!r} collides with a ddq tensor name")
            out[name] = None
        return out

    def stored_tensors(
        self, tensors: dict[str, torch.Tensor], version: int | None = None
    ) -> dict[str, torch.Tensor]:
        """The tensors as the file stores them: from 3 on, the layers' packed indices
        (``L.weight.idx``) concatenated into ``ddq.indices``; before, as they are."""
        version = self.format_version if version is None else version
        if version < 3 or not self.layers:
            return dict(tensors)
        keys = [index_key(n) for n in self.layers]
        out = {k: t for k, t in tensors.items() if k not in set(keys)}
        out[INDICES_KEY] = torch.cat([tensors[k].reshape(-1) for k in keys])
        return out

    def split_tensors(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`stored_tensors`: one ``L.weight.idx`` per layer (views)."""
        if INDICES_KEY not in stored or self.format_version < 3:
            return dict(stored)
        out = {k: t for k, t in stored.items() if k != INDICES_KEY}
        at = 0
        for name, spec in self.layers.items():
            n = packed_nbytes(spec.numel, spec.weight.bits)
            out[index_key(name)] = stored[INDICES_KEY][at : at + n]
            at += n
        return out

    def check_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Raise ``ValueError`` unless ``tensors`` are exactly what the manifest describes.

        Checks the set of names, each dtype and shape, the slices of the shared tensors,
        and each checksum.
        """
        try:
            expected = self.expected_tensors()
        except ValueError as e:
            raise _fail(source, f"manifest and tensors disagree: {e}") from e
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            problems = []
            if missing:
                problems.append(f"missing tensors {missing[:5]}")
            if extra:
                problems.append(f"tensors the manifest does not describe {extra[:5]}")
            raise _fail(source, "manifest and tensors disagree: " + "; ".join(problems))
        if set(self.checksums) != set(expected):
            raise _fail(
                source, "manifest and tensors disagree: checksums do not cover every tensor"
            )
        for name, want in expected.items():
            t = tensors[name]
            if want is not None and (t.dtype, tuple(t.shape)) != want:
                raise _fail(
                    source,
                    f"manifest and tensors disagree: tensor {name!r} is {t.dtype} "
                    f"{tuple(t.shape)}, the manifest implies {want[0]} {want[1]}",
                )
        if self.layers:
            spans = [(s.offset, s.tables_len, n) for n, s in self.layers.items()]
            _check_tiling(spans, tensors[TABLES_KEY].numel(), TABLES_KEY, source)
        if self.batchnorm:
            spans = [(b.offset, b.channels, n) for n, b in self.batchnorm.items()]
            _check_tiling(spans, tensors[BATCHNORM_KEY].shape[1], BATCHNORM_KEY, source)
        for name in expected:
            if checksum(tensors[name]) != self.checksums[name]:
                raise _fail(
                    source,
                    f"checksum mismatch for tensor {name!r}: the file is corrupted "
                    "(its bytes changed after export)",
                )
        for name, spec in self.layers.items():
            if spec.weight.per_channel:
                scales = spec.split_tables(tensors[TABLES_KEY])["channel_scales"]
                if not bool((torch.isfinite(scales) & (scales > 0)).all()):
                    raise _fail(
                        source,
                        f"manifest and tensors disagree: layer {name!r} has channel scales "
                        "that are not all finite and > 0",
                    )
