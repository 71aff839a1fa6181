"""Deployment: packed low-bit artifacts, their runtime, reference kernels, ONNX export.

- :func:`export` writes a prepared, calibrated model as one safetensors artifact (``b``-bit
  packed weight indices, tables, one scale per output channel for per-channel weights,
  float parts, a JSON manifest; see :mod:`ddq.deploy.manifest` for the format).
- :func:`load` rebuilds an executable model from it (no training-time modules, nothing
  unpickled), with decoded float weights or the reference integer/LUT kernels; the
  architecture comes from ``model=``, from ``model_factory=``, or (only when neither is
  given) from the model registry.
- :func:`export_onnx` writes standard-op ONNX (QDQ for uniform mode, per-channel on axis 0
  for per-channel weights; index + ``Gather``, times the channel scales, for adaptive
  mode) for ONNX Runtime.

Files, one concern each: :mod:`.freeze` (a prepared model into its deployable form),
:mod:`.artifact` (writing the file), :mod:`.reader` (reading it back, validated),
:mod:`.manifest` (the format), :mod:`.packing` (``b``-bit packing), :mod:`.runtime` (the
deploy modules), :mod:`.loader` (``load``: architecture + artifact -> runtime),
:mod:`.kernels` (reference kernels by family: integer GEMM, table lookup),
:mod:`.onnx_export` (ops, per-layer handlers, graph passes, entry point).

Example:
    >>> import ddq
    >>> info = ddq.export(model, "model.ddq.safetensors")  # doctest: +SKIP
    >>> runtime = ddq.load("model.ddq.safetensors")  # doctest: +SKIP
    >>> ddq.export_onnx(runtime, "model.onnx", example)  # doctest: +SKIP
"""

from .artifact import ArtifactInfo, export
from .freeze import freeze
from .kernels import int_conv2d, int_gemm, int_linear, lut_conv2d, lut_linear
from .loader import build_runtime, load
from .manifest import FORMAT_VERSION, Manifest
from .onnx_export import export_onnx
from .packing import pack_bits, packed_nbytes, unpack_bits
from .reader import read_artifact
from .runtime import (
    KERNELS,
    ChannelAffine,
    FrozenActivationQuantizer,
    PackedConv1d,
    PackedConv2d,
    PackedLinear,
    set_kernel,
)

__all__ = [
    "FORMAT_VERSION",
    "KERNELS",
    "ArtifactInfo",
    "ChannelAffine",
    "FrozenActivationQuantizer",
    "Manifest",
    "PackedConv1d",
    "PackedConv2d",
    "PackedLinear",
    "build_runtime",
    "export",
    "export_onnx",
    "freeze",
    "int_conv2d",
    "int_gemm",
    "int_linear",
    "load",
    "lut_conv2d",
    "lut_linear",
    "pack_bits",
    "packed_nbytes",
    "read_artifact",
    "set_kernel",
    "unpack_bits",
]
