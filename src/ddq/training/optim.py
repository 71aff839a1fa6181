"""Parameter groups: weights, quantizer levels and gate logits learn at their own rates."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..quantizer import DDQQuantizer

if TYPE_CHECKING:
    from .lifecycle import TrainConfig

__all__ = ["DDQOptimizer", "split_parameters"]


def split_parameters(
    model: nn.Module,
) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """``(weights, levels, gates)``: the model's own parameters, the quantizers' level
    parameters (range, gaps, step), and the quantizers' gate logits.

    ``DDQOptimizer`` puts SGD on the first and Adam on the other two, as ``train_ddq``
    does; use the groups for optimizers of your own.

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


class DDQOptimizer:
    """The optimizers ``train_ddq`` uses, as one object with ``zero_grad`` and ``step``.

    SGD (``lr``, ``momentum``, ``weight_decay``) on the weights; Adam on the quantizers'
    levels (``lr_levels``) and gate logits (``lr_gates``). Adam moves every parameter by
    about its rate per step however weak the gradient, which suits the gates (a bit
    opens or closes as a whole) and keeps the levels near their data-driven fit at a
    small rate. With ``total_steps`` the weights' and levels' rates follow a cosine
    schedule to zero over that many steps (the gates' stays constant); ``step()`` steps
    the optimizers, then the schedules.

    Args:
        model: the prepared model.
        config: any object with ``lr``, ``momentum``, ``weight_decay``, ``lr_levels`` and
            ``lr_gates`` (a ``TrainConfig``; its defaults when ``None``).
        total_steps: length of the cosine schedule; ``None`` keeps the rates constant.

    Example:
        >>> opt = DDQOptimizer(model, TrainConfig(), total_steps=1000)  # doctest: +SKIP
        >>> opt.zero_grad(); loss.backward(); opt.step()
    """

    def __init__(
        self, model: nn.Module, config: TrainConfig | Any = None, total_steps: int | None = None
    ) -> None:
        if config is None:
            from .lifecycle import TrainConfig

            config = TrainConfig()
        weights, levels, gates = split_parameters(model)
        self.weights = torch.optim.SGD(
            weights, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        self.quantizers = torch.optim.Adam(
            [{"params": levels, "lr": config.lr_levels}, {"params": gates, "lr": config.lr_gates}]
        )
        if total_steps is None:
            cosine = lambda _: 1.0  # noqa: E731
        else:
            total = max(int(total_steps), 1)
            cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
        self.weights_schedule = torch.optim.lr_scheduler.LambdaLR(self.weights, cosine)
        self.quantizers_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.quantizers, [cosine, lambda _: 1.0]
        )

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.weights, self.quantizers]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.weights.zero_grad(set_to_none=set_to_none)
        self.quantizers.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        """Both optimizer steps, then both schedule steps."""
        self.weights.step()
        self.quantizers.step()
        self.weights_schedule.step()
        self.quantizers_schedule.step()

    def get_last_lr(self) -> float:
        """The weights' learning rate now."""
        return self.weights_schedule.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {
            "opt_w": self.weights.state_dict(),
            "opt_q": self.quantizers.state_dict(),
            "sched_w": self.weights_schedule.state_dict(),
            "sched_q": self.quantizers_schedule.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights.load_state_dict(state["opt_w"])
        self.quantizers.load_state_dict(state["opt_q"])
        self.weights_schedule.load_state_dict(state["sched_w"])
        self.quantizers_schedule.load_state_dict(state["sched_q"])
