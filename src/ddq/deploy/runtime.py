"""The deploy runtime: the modules that execute a ddq artifact.

:func:`ddq.deploy.loader.load` rebuilds the architecture, checks that it matches the
artifact, and swaps in these modules:

* :class:`PackedLinear`, :class:`PackedConv1d`, :class:`PackedConv2d`: hold the packed
  ``b``-bit weight indices and the level table (plus scale/zero point in uniform mode, and
  one scale per output channel for a per-channel weight: ``w[c] = table[idx] * scale[c]``),
  and an optional :class:`FrozenActivationQuantizer` for their input.
* :class:`FrozenActivationQuantizer`: ``2**b - 1`` thresholds and ``2**b`` levels.
* :class:`ChannelAffine`: a BatchNorm as a per-channel scale and bias.

No ``DDQQuantizer`` (nor any other training-time module) is left in the result.

Two kernels (``load(..., kernel=...)`` or :func:`set_kernel`):

* ``"float"`` (default, fast): weights decoded once to float32 (``table[idx]``, times the
  channel scale for a per-channel weight), then the ordinary ``F.conv*d``/``F.linear``. It
  reproduces the fake-quantized model's outputs bit for bit (same tensors through the same
  PyTorch ops).
* ``"reference"``: the low-precision matrix products of the method's deployment
  (``docs/method.md``, "Deployment") from :mod:`ddq.deploy.kernels`: an integer GEMM on
  the indices with zero-point corrections when weight and input are both uniform (a
  per-channel weight gives a per-output-channel integer step), else the table-lookup
  accumulation (adds on the indices, then ``2**b`` multiplies per output, then one multiply
  by the channel scale, which factors out of the sum). Slow, exact in float64 for the
  integer GEMM; it shows what an integer or LUT accelerator computes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .freeze import decode_weight
from .kernels import int_conv2d, int_linear, lut_conv2d, lut_linear
from .manifest import TABLES_KEY, LayerSpec, QuantSpec, index_key
from .packing import unpack_bits

__all__ = [
    "KERNELS",
    "ChannelAffine",
    "FrozenActivationQuantizer",
    "PackedConv",
    "PackedConv1d",
    "PackedConv2d",
    "PackedLayer",
    "PackedLinear",
    "set_kernel",
]

KERNELS = ("float", "reference")


class FrozenActivationQuantizer(nn.Module):
    """A trained activation quantizer frozen to its ``b`` bits: thresholds + table.

    ``x`` becomes ``table[j]`` with ``j`` the number of thresholds strictly below ``x``
    (so inputs below the first threshold go to level 0, above the last to the top level).
    In uniform mode ``table[j] = scale * (j - zero_point)`` and ``j`` is the integer code.

    Example:
        >>> q = FrozenActivationQuantizer(QuantSpec("adaptive", 1, False),
        ...                               torch.tensor([0.5]), torch.tensor([0.0, 1.0]))
        >>> q(torch.tensor([0.2, 0.5, 0.7]))
        tensor([0., 0., 1.])
    """

    def __init__(self, spec: QuantSpec, thresholds: torch.Tensor, table: torch.Tensor) -> None:
        super().__init__()
        if thresholds.numel() != spec.levels - 1 or table.numel() != spec.levels:
            raise ValueError(f"a {spec.bits}-bit quantizer needs {spec.levels} levels")
        self.spec = spec
        self.register_buffer("thresholds", thresholds.contiguous())
        self.register_buffer("table", table.contiguous())

    def indices(self, x: torch.Tensor) -> torch.Tensor:
        """The ``b``-bit codes ``j`` of ``x`` (int64, same shape)."""
        # contiguous: bucketize would copy a strided input anyway, with a warning
        return torch.bucketize(x.contiguous(), self.thresholds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[self.indices(x)]

    def extra_repr(self) -> str:
        return f"mode={self.spec.mode}, bits={self.spec.bits}, signed={self.spec.signed}"


class ChannelAffine(nn.Module):
    """A frozen BatchNorm: ``y = x * scale[c] + bias[c]`` on channel dimension 1.

    Applied through PyTorch's inference BatchNorm kernel with zero mean, unit variance and
    ``eps = 0`` (which makes its internal scale and shift exactly ``scale`` and ``bias``):
    that kernel fuses the multiply-add, so this reproduces the trained BatchNorm bit for
    bit, where a separate ``x * scale + bias`` would differ in the last bit.

    Example:
        >>> ChannelAffine(torch.tensor([2.0]), torch.tensor([1.0]))(torch.ones(1, 1, 2))
        tensor([[[3., 3.]]])
    """

    def __init__(self, scale: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("bias", bias.contiguous())
        self.register_buffer("_zeros", torch.zeros_like(scale), persistent=False)
        self.register_buffer("_ones", torch.ones_like(scale), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self._zeros, self._ones, self.scale, self.bias, False, 0.0, 0.0)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}"


class PackedLayer(nn.Module):
    """Shared state of the packed layers: indices, tables, bias, input quantizer, kernel.

    The base of :class:`PackedLinear` and :class:`PackedConv` (public so that the ONNX
    export can recognise and translate every packed layer)."""

    weight: torch.Tensor

    def __init__(self, spec: LayerSpec, tensors: dict[str, torch.Tensor], name: str) -> None:
        super().__init__()
        self.spec = spec
        parts = {k: v.clone() for k, v in spec.split_tables(tensors[TABLES_KEY]).items()}
        self.register_buffer("weight_idx", tensors[index_key(name)].clone())
        self.register_buffer("weight_table", parts["weight_table"])
        # Per-channel weights: one scale per output channel (None: per tensor).
        self.register_buffer("weight_scale", parts.get("channel_scales"))
        self.register_buffer("bias", parts.get("bias"))
        self.input_quantizer: FrozenActivationQuantizer | None = None
        if spec.input is not None:
            self.input_quantizer = FrozenActivationQuantizer(
                spec.input, parts["thresholds"], parts["input_table"]
            )
        self.kernel = "float"
        self.register_buffer(
            "weight",
            decode_weight(self.weight_table, self.weight_codes(), self.weight_scale),
            persistent=False,
        )
        self._codes: torch.Tensor | None = None

    def weight_codes(self) -> torch.Tensor:
        """The unpacked ``b``-bit weight indices (uint8, the weight's shape)."""
        n = self.spec.numel
        return unpack_bits(self.weight_idx, self.spec.weight.bits, n).view(self.spec.weight_shape)

    def set_kernel(self, kernel: str) -> None:
        """``"float"`` (decoded weights) or ``"reference"`` (integer / LUT kernels)."""
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
        self.kernel = kernel
        # The reference kernels work on the codes; unpack once, not per call.
        self._codes = self.weight_codes() if kernel == "reference" else None

    def _integer_weight_step(self) -> float | torch.Tensor:
        """Uniform weights: the integer step, per tensor or per output channel (float64)."""
        w = self.spec.weight
        assert w.scale is not None
        if self.weight_scale is None:
            return w.scale
        return self.weight_scale.double() * w.scale  # a power of two times float32: exact

    def _integer_path(self) -> bool:
        iq = self.input_quantizer
        return self.spec.weight.mode == "uniform" and iq is not None and iq.spec.mode == "uniform"

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def extra_repr(self) -> str:
        w = self.spec.weight
        a = self.spec.input
        act = "float" if a is None else f"{a.mode} {a.bits}-bit"
        per = " per-channel" if w.per_channel else ""
        return (
            f"weight={list(self.spec.weight_shape)} {w.mode}{per} {w.bits}-bit, input={act}, "
            f"kernel={self.kernel}"
        )


class PackedLinear(PackedLayer):
    """Deploy ``Linear``: packed ``b``-bit weight codes + table, optional frozen input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "float":
            return F.linear(self._input(x), self.weight, self.bias)
        assert self._codes is not None
        w = self.spec.weight
        if self._integer_path():
            a = self.input_quantizer.spec  # type: ignore[union-attr]
            codes = self.input_quantizer.indices(x)  # type: ignore[union-attr]
            step = self._integer_weight_step()
            return int_linear(
                codes, a.scale, a.zero_point, self._codes, step, w.zero_point, self.bias
            )
        return lut_linear(
            self._input(x), self._codes, self.weight_table, self.bias, w_scale=self.weight_scale
        )


class PackedConv(PackedLayer):
    """The packed convolutions' shared code; ``dims`` (1 or 2) and ``pads`` (nn.Conv's
    explicit (left, right) pads, last dimension first) describe the geometry."""

    dims = 2

    def __init__(
        self, spec: LayerSpec, tensors: dict[str, torch.Tensor], name: str, like: nn.Module
    ) -> None:
        super().__init__(spec, tensors, name)
        conv = spec.conv or {}
        self.stride = tuple(conv["stride"])
        self.padding = (
            conv["padding"] if isinstance(conv["padding"], str) else tuple(conv["padding"])
        )
        self.dilation = tuple(conv["dilation"])
        self.groups = int(conv["groups"])
        self.padding_mode = conv["padding_mode"]
        # nn.Conv's own explicit (left, right) pads, last dimension first; "same" included.
        self.pads = tuple(like._reversed_padding_repeated_twice)

    def _conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        fn = F.conv1d if self.dims == 1 else F.conv2d
        if self.padding_mode != "zeros":  # as nn.Conv*d does it
            x = F.pad(x, self.pads, mode=self.padding_mode)
            return fn(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return fn(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "float":
            return self._conv(self._input(x), self.weight)
        return self._reference(x)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        assert self._codes is not None
        integer = self._integer_path()
        src = self.input_quantizer.indices(x).double() if integer else self._input(x)  # type: ignore[union-attr]
        zero = float(self.input_quantizer.spec.zero_point) if integer else 0.0  # type: ignore[union-attr]
        pads = self.pads
        symmetric = all(pads[i] == pads[i + 1] for i in range(0, len(pads), 2))
        if self.padding_mode == "zeros" and symmetric:
            padding = tuple(reversed(pads[::2]))
        else:
            # Zero padding means the real value 0, whose integer code is the zero point.
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            src = (
                F.pad(src, pads, mode=mode, value=zero)
                if mode == "constant"
                else F.pad(src, pads, mode=mode)
            )
            padding = (0,) * self.dims
        codes, stride, dilation = self._codes, self.stride, self.dilation
        if self.dims == 1:  # lower conv1d to conv2d with a height-1 kernel
            src, codes = src.unsqueeze(-2), codes.unsqueeze(-2)
            stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
        if integer:
            a, w = self.input_quantizer.spec, self.spec.weight  # type: ignore[union-attr]
            y = int_conv2d(
                src.long(), a.scale, a.zero_point, codes, self._integer_weight_step(),
                w.zero_point, self.bias, stride, padding, dilation, self.groups,
            )  # fmt: skip
        else:
            y = lut_conv2d(
                src, codes, self.weight_table, self.bias, stride, padding, dilation, self.groups,
                w_scale=self.weight_scale,
            )  # fmt: skip
        return y.squeeze(-2) if self.dims == 1 else y


class PackedConv1d(PackedConv):
    """Deploy ``Conv1d`` (grouped/depthwise too): packed weight codes + table."""

    dims = 1


class PackedConv2d(PackedConv):
    """Deploy ``Conv2d`` (grouped/depthwise too): packed weight codes + table."""

    dims = 2


def set_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Switch every packed layer of a loaded model to ``kernel`` (see the module docstring).

    Example:
        >>> set_kernel(ddq.load("model.ddq.safetensors"), "reference")  # doctest: +SKIP
    """
    for m in model.modules():
        if isinstance(m, PackedLayer):
            m.set_kernel(kernel)
    return model


def __getattr__(name: str) -> Any:
    # ``load`` and ``build_runtime`` moved to ddq.deploy.loader; they stay importable from
    # here (imported lazily: the loader imports this module).
    if name in ("load", "build_runtime"):
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
