"""Range statistics gathered from calibration batches, consistent across processes."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["RangeObserver"]

# Quantiles rather than min/max: one outlier activation in a calibration batch would
# otherwise stretch the range and waste levels once the layer drops to few bits.
_LOW_Q, _HIGH_Q = 1e-4, 1 - 1e-4
# torch.quantile refuses inputs above 2^24 elements; a strided sample is plenty.
_MAX_SAMPLE = 1 << 20


class RangeObserver:
    """Averages per-batch low/high quantiles; ``result()`` all-reduces under DDP.

    Example:
        >>> obs = RangeObserver()
        >>> obs.update(torch.linspace(-1, 1, 10001))
        >>> [round(v, 3) for v in obs.result()]
        [-1.0, 1.0]
    """

    def __init__(self) -> None:
        self._sum = torch.zeros(3, dtype=torch.float64)  # low, high, count

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1)
        if flat.numel() == 0:
            return
        if flat.numel() > _MAX_SAMPLE:
            flat = flat[:: flat.numel() // _MAX_SAMPLE + 1]
        qs = torch.quantile(flat.float(), flat.new_tensor([_LOW_Q, _HIGH_Q], dtype=torch.float32))
        self._sum += torch.tensor([qs[0].item(), qs[1].item(), 1.0], dtype=torch.float64)

    def result(self) -> tuple[float, float]:
        """The mean low and high quantile over all batches seen by every process."""
        total = self._sum.clone()
        if dist.is_available() and dist.is_initialized():
            dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
            t = total.to(dev)
            dist.all_reduce(t)
            total = t.cpu()
        if total[2] == 0:
            raise RuntimeError("no calibration data was observed")
        return float(total[0] / total[2]), float(total[1] / total[2])
