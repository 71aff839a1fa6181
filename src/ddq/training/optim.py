"""Parameter groups: weights, quantizer levels and gate logits learn at their own rates."""

from __future__ import annotations

from torch import nn

from ..quantizer import DDQQuantizer

__all__ = ["split_parameters"]


def split_parameters(
    model: nn.Module,
) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """``(weights, levels, gates)``: the model's own parameters, the quantizers' level
    parameters (range, gaps, step), and the quantizers' gate logits.

    Example:
        >>> weights, levels, gates = split_parameters(prepared_model)  # doctest: +SKIP
    """
    levels, gates, seen = [], [], set()
    for m in model.modules():
        if isinstance(m, DDQQuantizer):
            for name, p in m.named_parameters(recurse=False):
                (gates if name == "gate_logits" else levels).append(p)
                seen.add(id(p))
    weights = [p for p in model.parameters() if id(p) not in seen]
    return weights, levels, gates
