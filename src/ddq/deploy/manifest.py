"""The manifest of a ddq artifact: schema, format version, validation and checksums.

A ddq artifact is one safetensors file. Its tensors hold the numbers; the JSON manifest,
stored in the safetensors metadata under :data:`MANIFEST_KEY`, says what they mean.

Format version 2 (:data:`FORMAT_VERSION`; version 1 files, which are per-tensor throughout,
are still read). Tensors (``L`` a quantized layer's module name):

* ``L.weight.idx`` -- uint8: the weight's ``b``-bit level indices packed at exactly ``b``
  bits per element (:mod:`ddq.deploy.packing`: flat row-major order, little-endian bit
  stream, ``ceil(n * b / 8)`` bytes).
* ``ddq.tables`` -- float32, 1-D: every quantized layer's small float parts, one slice per
  layer starting at its ``offset``: the weight's ``2**b_w`` sorted levels; then, for a
  per-channel weight, its ``out_channels`` channel scales (all finite and > 0); then, when
  the input is quantized, the input quantizer's ``2**b_a - 1`` sorted thresholds and its
  ``2**b_a`` levels; then the bias (``out_channels`` values) if the layer has one. An input
  ``x`` becomes level ``j`` = the number of thresholds strictly below ``x``.
* ``ddq.batchnorm`` -- float32 ``(2, sum C)``: every BatchNorm as a per-channel scale
  (row 0) and bias (row 1), ``y = x * scale + bias``, channels ``offset .. offset + C``.
* every other entry of the model's state dict (layers ddq left float, LayerNorm, ...)
  under its own name and dtype.

The small parts share two tensors because each safetensors entry and checksum costs about
150 bytes of header: per-layer tensors would add 5-10% to a 2-bit MobileNetV2.

Manifest (compact JSON)::

    {"format": "ddq-artifact", "format_version": 1, "producer": "ddq 0.1.0",
     "architecture": {"name": "mobilenet_v2", "kwargs": {...}} or null,
     "conventions": {...},                                # DDQState.conventions()
     "layers": {L: {"type": "Conv2d", "weight_shape": [...], "bias": false, "offset": 0,
                    "conv": {"groups": 32, ...},          # only non-default conv settings
                    "weight": {"mode": "uniform", "bits": 4, "signed": true,
                               "per_channel": true,               # absent: per tensor
                               "scale": 16.0, "zero_point": 8},   # scale/zp: uniform only
                    "input": {...same fields, never per_channel...} or null}},
     "batchnorm": {B: {"channels": C, "offset": 0}},
     "float": [names of the float tensors],
     "checksums": {tensor name: 16 hex digits of BLAKE2b-64 of its raw bytes}}

The manifest's own BLAKE2b-64 digest is stored under :data:`DIGEST_KEY`, so an edit of
either the tensors or the manifest is caught. A uniform quantizer's levels are
``scale * (j - zero_point)`` (``scale`` is a float32 value, written with the shortest
decimal that reads back to it); its table holds the same levels as the exact float32
numbers the trained model used, so both decoders reproduce the fake-quantized model.

Per-channel weights (``"per_channel": true``): the table holds one *normalised* set of
levels for the layer and the weight element ``w[c, ...]`` with index ``j`` is
``table[j] * channel_scales[c]`` (one float32 multiply, exactly what the trained model
computed). Bits and table stay per layer; only the scale is per output channel (axis 0).
In uniform mode ``scale`` is the normalised grid's step (a power of two) and the integer
step of channel ``c`` is ``scale * channel_scales[c]`` (exact), with ``zero_point`` shared
by every channel: per-channel affine integer quantization on axis 0.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .packing import packed_nbytes

__all__ = [
    "BATCHNORM_KEY",
    "DIGEST_KEY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LAYER_TYPES",
    "MANIFEST_KEY",
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
FORMAT_VERSION = 2
# Versions this ddq reads: 1 (per-tensor weights only) and 2 (adds per-channel weights).
READ_VERSIONS = (1, 2)
MANIFEST_KEY = "ddq.manifest"
DIGEST_KEY = "ddq.manifest.blake2b"
TABLES_KEY = "ddq.tables"
BATCHNORM_KEY = "ddq.batchnorm"
LAYER_TYPES = ("Conv1d", "Conv2d", "Linear")
_MODES = ("adaptive", "uniform")
_RANK = {"Conv1d": 3, "Conv2d": 4, "Linear": 2}


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

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mode": self.mode, "bits": self.bits, "signed": self.signed}
        if self.per_channel:
            d["per_channel"] = True
        if self.mode == "uniform":
            assert self.scale is not None
            d["scale"], d["zero_point"] = _short_float32(self.scale), self.zero_point
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str, where: str) -> QuantSpec:
        mode = _get(d, "mode", str, source, where)
        if mode not in _MODES:
            raise _fail(source, f"manifest {where}.mode is {mode!r}, expected one of {_MODES}")
        bits = _get(d, "bits", int, source, where)
        if not 1 <= bits <= 8:
            raise _fail(source, f"manifest {where}.bits is {bits}, expected 1..8")
        signed = _get(d, "signed", bool, source, where)
        per_channel = False
        if "per_channel" in d:
            per_channel = _get(d, "per_channel", bool, source, where)
        if mode == "adaptive":
            return cls(mode, bits, signed, per_channel=per_channel)
        scale = float(np.float32(_get(d, "scale", (int, float), source, where)))
        zero_point = _get(d, "zero_point", int, source, where)
        if not (math.isfinite(scale) and scale > 0):
            raise _fail(source, f"manifest {where}.scale must be finite and > 0, got {scale}")
        if not 0 <= zero_point < 2**bits:
            raise _fail(source, f"manifest {where}.zero_point {zero_point} is not in 0..2**bits-1")
        return cls(mode, bits, signed, scale, zero_point, per_channel)


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

    def to_json(self) -> str:
        """Compact JSON (no spaces: the manifest is part of the artifact's size)."""
        d = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
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
        return json.dumps(d, separators=(",", ":"), allow_nan=False)

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
        arch = d.get("architecture")
        if arch is not None and (
            not isinstance(arch, dict)
            or not isinstance(arch.get("name"), str)
            or not isinstance(arch.get("kwargs", {}), dict)
        ):
            raise _fail(source, f"manifest architecture must be {{name, kwargs}}, got {arch!r}")
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

    def expected_tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]] | None]:
        """Tensor name -> (dtype, shape) the manifest implies (``None``: float tensors)."""
        out: dict[str, tuple[torch.dtype, tuple[int, ...]] | None] = {}
        for name, spec in self.layers.items():
            out[index_key(name)] = (torch.uint8, (packed_nbytes(spec.numel, spec.weight.bits),))
        if self.layers:
            total = sum(s.tables_len for s in self.layers.values())
            out[TABLES_KEY] = (torch.float32, (total,))
        if self.batchnorm:
            out[BATCHNORM_KEY] = (
                torch.float32,
                (2, sum(b.channels for b in self.batchnorm.values())),
            )
        for name in self.float_tensors:
            if name in out:
                raise ValueError(f"float tensor {name!r} collides with a ddq tensor name")
            out[name] = None
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
