"""Load and save model weights safely.

:func:`load_weights` reads ``.safetensors`` files and PyTorch ``.pt``/``.pth`` state dicts,
the latter with ``torch.load(weights_only=True)`` so a checkpoint can never run code while
being read. :func:`save_weights` writes safetensors atomically.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write_bytes

__all__ = ["load_weights", "save_weights"]

_MAX_LISTED = 5  # keys shown per category in a mismatch error: enough to diagnose, still short


def _is_safetensors(path: Path) -> bool:
    """Recognize safetensors by content (8-byte header length, then a JSON object) so a file
    with an unusual suffix still loads with the right reader."""
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_state_dict(path: Path) -> Mapping[str, Any]:
    if _is_safetensors(path):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # safetensors is an optional extra (ddq[cli])
            raise ImportError(
                f"reading {path} needs safetensors (pip install 'ddq[cli]' or safetensors)"
            ) from exc
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # SafetensorError, OSError, ...: all mean "unreadable"
            raise ValueError(f"cannot read safetensors file {path}: {exc}") from exc
    if path.stat().st_size == 0:
        raise ValueError(f"cannot read weights file {path}: the file is empty")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only=True refuses any global outside torch's allow-list *before* calling it,
        # so a planted payload is reported here instead of executed.
        raise ValueError(
            f"refused to load {path}: torch.load(weights_only=True) rejected it (the file is "
            "corrupt, or it needs arbitrary Python objects, which ddq never unpickles): "
            f"{_unpickling_reason(exc)}"
        ) from exc
    except Exception as exc:  # truncated zip, random bytes, wrong format ...
        raise ValueError(
            f"cannot read weights file {path} (corrupt or truncated?): {type(exc).__name__}: {exc}"
        ) from exc
    return _unwrap(obj, path)


def _unpickling_reason(exc: BaseException) -> str:
    """Keep the specific reason from torch's weights_only error, dropping its boilerplate
    (which, among other things, suggests retrying with weights_only=False: bad advice here)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in str(exc).splitlines()]
    reasons = [ln for ln in lines if ln and not ln.startswith(boilerplate)]
    reason = " ".join(reasons).replace("WeightsUnpickler error:", "").strip()
    return reason or type(exc).__name__


def _unwrap(obj: Any, path: Path) -> Mapping[str, Any]:
    # Training checkpoints often nest the weights next to optimizer state and metadata.
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return inner
        return obj
    raise ValueError(
        f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of name -> tensor, "
        "optionally under 'state_dict' or 'model')"
    )


def _strip_module_prefix(state: Mapping[str, Any], model_keys: set[str]) -> Mapping[str, Any]:
    # DistributedDataParallel / DataParallel checkpoints prefix every key with "module.".
    prefix = "module."
    if (
        state
        and all(k.startswith(prefix) for k in state)
        and not any(k.startswith(prefix) for k in model_keys)
    ):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _fmt(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return f"[{shown}]{more}"


def load_weights(model: nn.Module, path: str | os.PathLike[str], strict: bool = True) -> nn.Module:
    """Load weights from ``path`` into ``model`` (in place) and return the model.

    Accepts ``.safetensors`` files and ``torch.save``-d state dicts (``.pt``/``.pth``), bare
    or wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``; a ``module.`` prefix left by
    DistributedDataParallel is removed. Pickles are read with ``weights_only=True``: a file
    that needs arbitrary Python objects is refused, never executed.

    Args:
        model: the module to load into (its architecture must match the file).
        path: weights file.
        strict: if False, missing and unexpected keys are tolerated (e.g. loading a float
            checkpoint into a model with extra quantizer state); shape mismatches never are.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is unreadable/corrupt/unsafe, or its keys/shapes do not match
            ``model`` (the message lists the first few offending keys).

    Example:
        >>> model = create_model("small_cnn", in_channels=1)
        >>> save_weights(model, "small.safetensors")
        >>> load_weights(create_model("small_cnn", in_channels=1), "small.safetensors")
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"weights file not found: {p}")
    if not p.is_file():
        raise ValueError(f"weights path is not a file: {p}")
    state = _read_state_dict(p)

    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{p} is not a tensor state dict; non-tensor entries: {_fmt(bad)}")

    expected = model.state_dict()
    state = _strip_module_prefix(state, set(expected))
    missing = [k for k in expected if k not in state]
    # Sorted: file order is arbitrary (safetensors stores keys sorted, pickles as saved).
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatches {_fmt(mismatched)}")
    if strict and missing:
        problems.append(f"missing keys {_fmt(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys {_fmt(unexpected)}")
    if problems:
        raise ValueError(
            f"weights in {p} do not match {type(model).__name__}: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=strict)
    return model


def save_weights(
    model: nn.Module, path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """Write ``model.state_dict()`` to ``path`` as safetensors, atomically; return the path.

    The file is written to a temporary file in the same folder and then renamed over
    ``path`` with ``os.replace``, so a crash or a concurrent reader never sees a half-written
    file. Parent folders are created. Shared (tied) tensors are stored as separate copies,
    which safetensors requires.

    Example:
        >>> save_weights(create_model("small_cnn"), "runs/exp1/model.safetensors")
        PosixPath('runs/exp1/model.safetensors')
    """
    from safetensors.torch import save

    # clone(): breaks storage sharing between tied tensors and detaches from the live model.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    p = atomic_write_bytes(path, save(tensors, metadata=metadata))
    return p
