"""Statistics gathered from calibration batches, consistent across processes."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["RangeObserver", "combine_processes", "has_nonfinite"]

# Quantiles rather than min/max: one outlier activation in a calibration batch would
# otherwise stretch the range and waste levels once the layer drops to few bits.
_LOW_Q, _HIGH_Q = 1e-4, 1 - 1e-4
# torch.quantile refuses inputs above 2^24 elements; a strided sample is plenty.
_MAX_SAMPLE = 1 << 20
# Elements kept per batch for the MSE / Lloyd fit (a strided subsample): 8 batches give
# 2^18, enough for <= 256 levels, and the memory stays small for 50+ quantizers.
_KEEP_PER_BATCH = 1 << 15


def has_nonfinite(x: torch.Tensor) -> bool:
    """Whether ``x`` holds a NaN or Inf: one cheap reduction first, the exact elementwise
    test only when it trips (a finite sum can also overflow to Inf)."""
    return not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all())


def combine_processes(t: torch.Tensor, op: str) -> torch.Tensor:
    """``t`` summed over processes (``op="sum"``) or gathered and concatenated (``"cat"``)
    under DDP, on the CPU; ``t`` itself otherwise."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    local = t.to(dev)
    if op == "sum":
        dist.all_reduce(local)
        return local.cpu()
    # Processes may hold different counts: pad to the largest, then drop the padding.
    count = torch.tensor([local.numel()], device=dev)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    size = int(max(c.item() for c in counts))
    padded = torch.zeros(size, dtype=local.dtype, device=dev)
    padded[: local.numel()] = local
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts, strict=True)]).cpu()


class RangeObserver:
    """Per-batch quantiles and a strided subsample of every batch seen.

    ``result()`` is the mean low/high quantile, ``sample()`` the subsample; both are
    combined over processes under DDP, so every process fits the same levels. A batch with
    NaN or Inf raises ``FloatingPointError`` naming the quantizer (``label``): it would
    otherwise silently turn the levels to NaN.

    Example:
        >>> obs = RangeObserver()
        >>> obs.update(torch.linspace(-1, 1, 10001))
        >>> [round(v, 3) for v in obs.result()]
        [-1.0, 1.0]
        >>> obs.sample().numel()
        10001
    """

    def __init__(self, label: str = "quantizer") -> None:
        self.label = label
        self._sum = torch.zeros(3, dtype=torch.float64)  # low, high, count
        self._kept: list[torch.Tensor] = []

    @property
    def batches(self) -> int:
        """Batches observed by this process."""
        return int(self._sum[2])

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1)
        if flat.numel() == 0:
            return
        if has_nonfinite(flat):
            raise FloatingPointError(
                f"{self.label}: calibration input contains NaN or Inf (it entered the network "
                "at or before this layer); refusing to fit levels to it"
            )
        if flat.numel() > _MAX_SAMPLE:
            flat = flat[:: flat.numel() // _MAX_SAMPLE + 1]
        qs = torch.quantile(flat.float(), flat.new_tensor([_LOW_Q, _HIGH_Q], dtype=torch.float32))
        self._sum += torch.tensor([qs[0].item(), qs[1].item(), 1.0], dtype=torch.float64)
        keep = flat[:: max(flat.numel() // _KEEP_PER_BATCH, 1)]
        self._kept.append(keep.float().cpu().clone())

    def result(self) -> tuple[float, float]:
        """The mean low and high quantile over all batches seen by every process."""
        total = combine_processes(self._sum.clone(), "sum")
        if total[2] == 0:
            raise RuntimeError(f"{self.label}: no calibration data was observed")
        return float(total[0] / total[2]), float(total[1] / total[2])

    def sample(self) -> torch.Tensor:
        """The subsample of every batch seen by every process, as one 1-D tensor."""
        local = torch.cat(self._kept) if self._kept else torch.zeros(0)
        out = combine_processes(local, "cat")
        if out.numel() == 0:
            raise RuntimeError(f"{self.label}: no calibration data was observed")
        return out
