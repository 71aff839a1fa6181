"""Write a prepared DDQ model as one packed low-bit artifact (``export``).

The contents come from :func:`ddq.deploy.freeze.freeze`; this module serialises them as
one safetensors file with the JSON manifest (format: :mod:`ddq.deploy.manifest`) and
reports the sizes. Reading is :func:`ddq.deploy.reader.read_artifact`, re-exported here
with the freezing helpers so that older imports keep working.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..atomic import atomic_write_bytes
from .freeze import activation_thresholds, batchnorm_affine, decode_weight, freeze
from .manifest import DIGEST_KEY, MANIFEST_KEY, checksum
from .reader import read_artifact

logger = logging.getLogger(__name__)

__all__ = [
    "ArtifactInfo",
    "activation_thresholds",
    "batchnorm_affine",
    "decode_weight",
    "export",
    "freeze",
    "read_artifact",
]


@dataclass(frozen=True)
class ArtifactInfo:
    """Sizes of an exported artifact.

    Attributes:
        path: the artifact file.
        fp32_bytes: the model's float32 size (4 bytes per floating-point element of its
            state dict, DDQ quantizer state excluded).
        artifact_bytes: the file's size.
        theoretical_bytes: ``sum(n * b / 8)`` over quantized weights + tables (levels,
            per-channel weight scales, thresholds, biases) + float parts.
        quantized_params: number of quantized weight elements.
        avg_weight_bits: ``sum(n * b) / sum(n)`` over the quantized weights.
    """

    path: Path
    fp32_bytes: int
    artifact_bytes: int
    theoretical_bytes: float
    quantized_params: int
    avg_weight_bits: float

    @property
    def ratio(self) -> float:
        """Compression ratio, ``fp32_bytes / artifact_bytes``."""
        return self.fp32_bytes / self.artifact_bytes

    @property
    def overhead(self) -> float:
        """``artifact_bytes / theoretical_bytes - 1`` (header and manifest)."""
        return self.artifact_bytes / self.theoretical_bytes - 1

    def __str__(self) -> str:
        return (
            f"{self.path}: FP32 {self.fp32_bytes:,} B -> artifact {self.artifact_bytes:,} B "
            f"({self.ratio:.2f}x smaller, average weight bits {self.avg_weight_bits:.2f}, "
            f"{self.overhead:+.1%} over the theoretical {self.theoretical_bytes:,.0f} B)"
        )


def export(
    model: nn.Module,
    path: str | Path,
    arch: dict[str, Any] | None = None,
    *,
    verbose: bool = False,
) -> ArtifactInfo:
    """Write a prepared, calibrated (frozen) model as one packed low-bit artifact.

    Args:
        model: a model prepared with ``ddq.prepare`` and calibrated/trained; in float32.
        path: output file (conventionally ``*.ddq.safetensors``); written atomically.
        arch: the architecture reference ``{"name": registry name, "kwargs": {...}}``
            recorded so that ``ddq.load(path)`` can rebuild the model; defaults to
            ``model.ddq_arch``; ``None`` means ``load`` needs a model instance.
        verbose: log the size line (FP32 bytes, artifact bytes, ratio) at INFO.

    Returns:
        An :class:`ArtifactInfo` with the sizes.

    Example:
        >>> info = export(model, "run/model.ddq.safetensors",
        ...               arch={"name": "resnet18", "kwargs": {"num_classes": 10}})  # doctest: +SKIP
        >>> print(f"{info.ratio:.1f}x smaller")  # doctest: +SKIP
        7.6x smaller
    """
    try:
        from safetensors.torch import save
    except ImportError as e:  # safetensors is an optional extra (ddq[cli])
        raise ImportError("ddq.export needs safetensors (pip install safetensors)") from e
    path = Path(path)
    manifest, tensors, sizes = freeze(model, arch)
    text = manifest.to_json()
    metadata = {MANIFEST_KEY: text, DIGEST_KEY: checksum(text.encode())}
    data = save(manifest.stored_tensors(tensors), metadata=metadata)
    atomic_write_bytes(path, data)
    n = max(int(sizes["quantized_params"]), 1)
    info = ArtifactInfo(
        path=path,
        fp32_bytes=int(sizes["fp32_bytes"]),
        artifact_bytes=len(data),
        theoretical_bytes=sizes["theoretical_bytes"],
        quantized_params=int(sizes["quantized_params"]),
        avg_weight_bits=sizes["weight_bits"] / n,
    )
    if verbose:
        logger.info("%s", info)
    return info
