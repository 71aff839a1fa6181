"""The gated Kronecker merge ``v = U(g) q`` of DDQ, applied axis by axis.

``U(g) = A_1 ⊗ A_2 ⊗ ... ⊗ A_K`` with ``A_k = g_k I_2 + (1 - g_k) J_2 / 2``. Reshaping the
``2^K`` fine levels to ``(2,) * K`` (C order, so axis 0 is the most significant bit of the
level index), the Kronecker product acts as ``A_k`` along axis ``k - 1``. ``J_2 / 2``
replaces both entries by their mean, so ``A_k x = g_k x + (1 - g_k) mean(x)``: the whole
merge is ``K`` mean-and-blend passes over ``2^K`` numbers, O(K 2^K), and the dense
``2^K x 2^K`` matrix never exists.
"""

from __future__ import annotations

import torch

__all__ = ["kronecker_merge"]


def kronecker_merge(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Apply ``U(g)`` to the fine level vector ``q``.

    Args:
        q: fine levels, shape ``(2**K,)``.
        g: gates, shape ``(K,)``, most significant bit first. Values in ``[0, 1]``; with
            hard gates (0/1, closed ones at the least significant end) the result holds
            ``2**sum(g)`` distinct values: means of adjacent blocks of ``2**(K - b)`` levels.

    Returns:
        ``v`` of shape ``(2**K,)``, differentiable in both ``q`` and ``g`` (``U`` is linear
        in each ``g_k``).

    Example:
        >>> q = torch.arange(8.0)
        >>> kronecker_merge(q, torch.tensor([1.0, 1.0, 0.0]))
        tensor([0.5000, 0.5000, 2.5000, 2.5000, 4.5000, 4.5000, 6.5000, 6.5000])
    """
    k_bits = g.numel()
    if q.numel() != 2**k_bits:
        raise ValueError(f"q has {q.numel()} levels but {k_bits} gates need 2**{k_bits}")
    v = q.reshape((2,) * k_bits)
    for k in range(k_bits):
        gk = g[k]
        v = gk * v + (1 - gk) * v.mean(dim=k, keepdim=True)
    return v.reshape(-1)
