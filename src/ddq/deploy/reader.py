"""Read a ddq artifact back, safely: ``read_artifact`` (never unpickles anything).

It parses the safetensors header itself and checks the manifest digest, the format
version, every tensor's dtype, shape and checksum before returning.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .manifest import DIGEST_KEY, MANIFEST_KEY, Manifest, checksum

__all__ = ["MAX_HEADER_BYTES", "read_artifact"]

# A header larger than this is not a ddq manifest (it guards the JSON parser against a
# random or hostile length field).
MAX_HEADER_BYTES = 100 * 2**20


def read_artifact(path: str | Path) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Read and fully validate an artifact; never unpickles anything.

    Returns:
        ``(manifest, tensors)``, the tensors as :func:`ddq.deploy.freeze.freeze` gives them
        (one ``L.weight.idx`` per layer, whatever the file version).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: naming the file and the problem: not a safetensors file (e.g. a pickle),
            truncated, no ddq manifest, manifest digest mismatch, unknown format version,
            manifest and tensors that disagree, or a tensor checksum mismatch.

    Example:
        >>> manifest, tensors = read_artifact("model.ddq.safetensors")  # doctest: +SKIP
    """
    try:
        from safetensors.torch import load
    except ImportError as e:
        raise ImportError("ddq.load needs safetensors (pip install safetensors)") from e
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"artifact not found: {path}")
    data = path.read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: not a ddq artifact: only {len(data)} bytes (truncated?)")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, MAX_HEADER_BYTES):
        raise ValueError(
            f"{path}: not a ddq artifact, or truncated: the safetensors header length field "
            f"says {n} bytes but the file has {len(data) - 8} after it (a pickle or zip "
            "file, e.g. from torch.save, looks like this; ddq never unpickles)"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a ddq artifact: the header is not JSON ({e})") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or MANIFEST_KEY not in meta:
        raise ValueError(f"{path}: a safetensors file without a ddq manifest ({MANIFEST_KEY!r})")
    text = meta[MANIFEST_KEY]
    if checksum(text.encode()) != meta.get(DIGEST_KEY):
        raise ValueError(
            f"{path}: the manifest's checksum does not match: it was edited or corrupted"
        )
    manifest = Manifest.from_json(text, str(path))
    try:
        tensors = load(data)
    except Exception as e:  # SafetensorError and friends: offsets, sizes, dtypes
        raise ValueError(f"{path}: corrupted or truncated tensor data: {e}") from e
    manifest.check_tensors(tensors, str(path))
    return manifest, manifest.split_tensors(tensors)
