"""Atomic checkpoints that load without unpickling arbitrary objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` of plain data (tensors, numbers, strings, lists, dicts), atomically.

    Example:
        >>> save_checkpoint(tmp / "ckpt.pt", {"epoch": 1, "model": model.state_dict()})  # doctest: +SKIP
    """
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: no arbitrary object is unpickled.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is truncated, corrupt, or holds objects other than plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt/unsafe files
        raise ValueError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from e
