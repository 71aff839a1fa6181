"""Where a job runs: the device check and joining the ``torchrun`` process group."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["check_device", "init_distributed"]


def check_device(device: Any) -> torch.device:
    """``device`` parsed and usable on this machine, or a ``ValueError`` naming it.

    Example:
        >>> check_device("cpu")
        device(type='cpu')
    """
    if not isinstance(device, str | torch.device):
        raise ValueError(f"device must be a string such as 'cpu' or 'cuda:0', got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"unknown device {str(device)!r}: expected cpu, cuda[:N] or mps") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} is not available: CUDA is not usable here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r} is not available: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r} is not available: MPS is not usable here")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except Exception as e:  # backend not built in, no driver, bad index ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"device {str(device)!r} is not available: {first}") from e
    return dev


def init_distributed(device: str) -> bool:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True
