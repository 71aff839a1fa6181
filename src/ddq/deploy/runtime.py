"""The deploy runtime: modules that execute a ddq artifact, and ``load``.

``load`` rebuilds the architecture (from the registry name in the manifest, or from a model
instance you pass), checks that it matches the artifact, and swaps in these modules:

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

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizer import DDQQuantizer
from .artifact import _conv_params, decode_weight, read_artifact
from .kernels import int_conv2d, int_linear, lut_conv2d, lut_linear
from .manifest import BATCHNORM_KEY, TABLES_KEY, LayerSpec, Manifest, QuantSpec, index_key
from .packing import unpack_bits

__all__ = [
    "KERNELS",
    "ChannelAffine",
    "FrozenActivationQuantizer",
    "PackedConv1d",
    "PackedConv2d",
    "PackedLinear",
    "build_runtime",
    "load",
    "set_kernel",
]

KERNELS = ("float", "reference")
_LAYER_CLASSES = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Linear": nn.Linear}


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
        return torch.bucketize(x, self.thresholds)

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


class _PackedLayer(nn.Module):
    """Shared state of the packed layers: indices, tables, bias, input quantizer, kernel."""

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


class PackedLinear(_PackedLayer):
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


class _PackedConv(_PackedLayer):
    _dims = 2

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
        self._pads = tuple(like._reversed_padding_repeated_twice)

    def _conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        fn = F.conv1d if self._dims == 1 else F.conv2d
        if self.padding_mode != "zeros":  # as nn.Conv*d does it
            x = F.pad(x, self._pads, mode=self.padding_mode)
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
        pads = self._pads
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
            padding = (0,) * self._dims
        codes, stride, dilation = self._codes, self.stride, self.dilation
        if self._dims == 1:  # lower conv1d to conv2d with a height-1 kernel
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
        return y.squeeze(-2) if self._dims == 1 else y


class PackedConv1d(_PackedConv):
    """Deploy ``Conv1d`` (grouped/depthwise too): packed weight codes + table."""

    _dims = 1


class PackedConv2d(_PackedConv):
    """Deploy ``Conv2d`` (grouped/depthwise too): packed weight codes + table."""

    _dims = 2


def set_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Switch every packed layer of a loaded model to ``kernel`` (see the module docstring).

    Example:
        >>> set_kernel(ddq.load("model.ddq.safetensors"), "reference")  # doctest: +SKIP
    """
    for m in model.modules():
        if isinstance(m, _PackedLayer):
            m.set_kernel(kernel)
    return model


# ------------------------------------------------------------------------- building
def _submodule(model: nn.Module, name: str, source: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(
            f"{source}: the architecture does not match the artifact: it has no module {name!r}"
        ) from e


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _check_layer(mod: nn.Module, spec: LayerSpec, name: str, source: str) -> None:
    def mismatch(what: str) -> ValueError:
        return ValueError(
            f"{source}: the architecture does not match the artifact: layer {name!r} {what}"
        )

    if not isinstance(mod, _LAYER_CLASSES[spec.type]):
        raise mismatch(f"is a {type(mod).__name__}, the artifact has a {spec.type}")
    shape = tuple(mod.weight.shape)
    if shape != spec.weight_shape:
        raise mismatch(f"has weight shape {shape}, the artifact {spec.weight_shape}")
    if (getattr(mod, "bias", None) is not None) != spec.bias:
        raise mismatch("differs in having a bias")
    if spec.conv is not None and _conv_params(mod) != spec.conv:
        raise mismatch(f"has conv settings {_conv_params(mod)}, the artifact {spec.conv}")


def _make_layer(
    mod: nn.Module, spec: LayerSpec, tensors: dict[str, torch.Tensor], name: str
) -> _PackedLayer:
    if spec.type == "Linear":
        return PackedLinear(spec, tensors, name)
    cls = PackedConv1d if spec.type == "Conv1d" else PackedConv2d
    return cls(spec, tensors, name, mod)


@torch.no_grad()
def build_runtime(
    model: nn.Module,
    manifest: Manifest,
    tensors: dict[str, torch.Tensor],
    kernel: str = "float",
    source: str = "artifact",
) -> nn.Module:
    """Turn ``model`` (the architecture, modified in place) into the deploy runtime.

    Quantized layers become packed layers, BatchNorms :class:`ChannelAffine`, and every
    other tensor is loaded from the artifact. Errors are ``ValueError`` naming ``source``.

    Example:
        >>> manifest, tensors = read_artifact(path)  # doctest: +SKIP
        >>> runtime = build_runtime(create_model("resnet18"), manifest, tensors)  # doctest: +SKIP
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    for name, spec in manifest.layers.items():
        mod = _submodule(model, name, source)
        _check_layer(mod, spec, name, source)
        _set_submodule(model, name, _make_layer(mod, spec, tensors, name))
    for name, bn in manifest.batchnorm.items():
        mod = _submodule(model, name, source)
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm) or mod.num_features != bn.channels:
            raise ValueError(
                f"{source}: the architecture does not match the artifact: {name!r} is "
                f"{type(mod).__name__}, the artifact has a BatchNorm of {bn.channels} channels"
            )
        scale, bias = bn.split(tensors[BATCHNORM_KEY])
        _set_submodule(model, name, ChannelAffine(scale.clone(), bias.clone()))
    leftover = [n for n, m in model.named_modules() if isinstance(m, DDQQuantizer)]
    if leftover:
        raise ValueError(
            f"{source}: the architecture does not match the artifact: quantizers "
            f"{leftover[:5]} belong to layers the artifact stores in float; pass the float "
            "architecture (or the model that was exported)"
        )
    replaced = tuple(n + "." for n in [*manifest.layers, *manifest.batchnorm])
    state = model.state_dict()
    wanted = {k for k in state if not k.startswith(replaced)}
    stored = set(manifest.float_tensors)
    if wanted != stored:
        raise ValueError(
            f"{source}: the architecture does not match the artifact: float tensors missing "
            f"from the artifact {sorted(wanted - stored)[:5]}, not in the architecture "
            f"{sorted(stored - wanted)[:5]}"
        )
    for key in manifest.float_tensors:
        target, value = state[key], tensors[key]
        if target.shape != value.shape or target.dtype != value.dtype:
            raise ValueError(
                f"{source}: the architecture does not match the artifact: {key!r} is "
                f"{target.dtype} {tuple(target.shape)} in the model, {value.dtype} "
                f"{tuple(value.shape)} in the artifact"
            )
        target.copy_(value)
    if hasattr(model, "ddq_state"):
        del model.ddq_state  # the result is no longer a prepared (trainable) model
    model.ddq_manifest = manifest
    set_kernel(model, kernel)
    return model.eval()


def _architecture(manifest: Manifest, source: str) -> nn.Module:
    arch = manifest.architecture
    if arch is None:
        raise ValueError(
            f"{source}: the artifact records no architecture; pass model= (an instance of "
            "the architecture it was exported from)"
        )
    from ..models import create_model

    try:
        return create_model(arch["name"], **arch.get("kwargs", {}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: cannot build the recorded architecture {arch}: {e}") from e


def load(path: str | Path, model: nn.Module | None = None, kernel: str = "float") -> nn.Module:
    """Load a ddq artifact as an executable model (eval mode), without unpickling anything.

    Args:
        path: the file written by ``ddq.export``.
        model: an instance of the architecture (float or prepared; it is copied, not
            modified); by default the model is built from the registry name in the manifest.
            The result is on the CPU (``.to(device)`` it).
        kernel: ``"float"`` (decoded weights, fast) or ``"reference"`` (the integer/LUT
            kernels of ``ddq.deploy.kernels``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: naming the file and the problem (corrupted, truncated, unknown format
            version, manifest/tensor disagreement, architecture mismatch).

    Example:
        >>> runtime = load("run/model.ddq.safetensors")  # doctest: +SKIP
        >>> logits = runtime(images)  # doctest: +SKIP
    """
    manifest, tensors = read_artifact(path)
    template: Any = (
        copy.deepcopy(model).cpu() if model is not None else _architecture(manifest, str(path))
    )
    return build_runtime(template, manifest, tensors, kernel=kernel, source=str(path))
