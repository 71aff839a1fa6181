"""Ordered precision gates ``g_1 >= g_2 >= ... >= g_K`` trained straight-through.

Each bit ``k`` has a logit ``gamma_k`` and a hard gate ``h_k = 1[gamma_k > 0]``. The
ordered gate is ``g_k = g_{k-1} h_k``, so a bit can only be open when every more
significant bit is, and ``b = sum_k g_k`` is the bitwidth.

Gradient (a documented choice; the method only asks for straight-through gates): the
predecessor ``g_{k-1}`` is treated as a constant in the backward pass, and ``h_k``
passes its gradient straight through (``dh/dgamma = 1``). So
``dL/dgamma_k = g_{k-1} dL/dg_k``: every bit whose predecessors are open -- the open bits
and the first closed one -- learns from its own merge factor alone. With the full
product rule the most significant free bit would collect the budget gradient of all bits
below it, be pushed closed first, and drop the layer from 8 bits to the floor in one step.
Bits behind the first closed one get no gradient: opening them would split
non-adjacent blocks, which is not a bitwidth.
"""

from __future__ import annotations

import torch

__all__ = ["ordered_gates"]


def ordered_gates(logits: torch.Tensor, floor: int, ceiling: int) -> torch.Tensor:
    """Hard ordered gates with straight-through gradients.

    Args:
        logits: ``gamma``, shape ``(K,)``, most significant bit first.
        floor: bits ``1..floor`` are always open (``min_bits``); they get no gradient.
        ceiling: bits ``ceiling+1..K`` are always closed (a bit cap or a frozen bitwidth).

    Returns:
        Float gates of shape ``(K,)`` with values in {0, 1}.

    Example:
        >>> ordered_gates(torch.tensor([1.0, 1.0, -1.0, 1.0]), floor=1, ceiling=4)
        tensor([1., 1., 0., 0.])
    """
    k_bits = logits.numel()
    idx = torch.arange(1, k_bits + 1, device=logits.device)
    hard = (logits > 0).to(logits.dtype)
    hard = torch.where(idx <= floor, torch.ones_like(hard), hard)
    hard = torch.where(idx > ceiling, torch.zeros_like(hard), hard)
    # Straight-through on h for the free bits only: forward is the hard value.
    free = ((idx > floor) & (idx <= ceiling)).to(logits.dtype)
    h = hard + free * (logits - logits.detach())
    # g_k = g_{k-1}.detach() * h_k, evaluated with a cumulative product of the hard values.
    prev = torch.cat([hard.new_ones(1), torch.cumprod(hard, 0)[:-1]])
    return prev * h
