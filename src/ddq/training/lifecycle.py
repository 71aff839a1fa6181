"""The DDQ training lifecycle for your own model, loss and loop.

``DDQTrainer`` is to DDQ what torchao's QAT ``prepare``/``convert`` steps and
coremltools' ``prepare``/``step``/``finalize`` palettizers are to theirs: the model is
prepared with ``ddq.prepare``, then the trainer calibrates it, adds the budget
constraint to the loss each step, updates the constraint after each optimizer step, and
finally fits the bits to the budget from the gradients of *your* loss and freezes them.
``train_ddq`` is a thin loop over it.

Example:
    >>> trainer = DDQTrainer(model, Budget(avg_weight_bits=4), TrainConfig(epochs=2),
    ...                      steps_per_epoch=len(loader))             # doctest: +SKIP
    >>> trainer.calibrate(loader); opt = trainer.optimizer()          # doctest: +SKIP
    >>> for step, (x, y) in enumerate(loader):                        # doctest: +SKIP
    ...     loss = trainer.loss(F.cross_entropy(model(x), y))
    ...     opt.zero_grad(); loss.backward(); trainer.clip_gradients()
    ...     opt.step(); trainer.step()
    >>> trainer.finalize(loader, lambda m, b: F.cross_entropy(m(b[0]), b[1]))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..budget import Budget, BudgetConstraint, BudgetTracker, CostModel, FitAction, fit_to_budget
from ..conversion.calibrate import calibrate
from ..layers import quantizers_of
from .optim import DDQOptimizer

__all__ = ["DDQTrainer", "TrainConfig"]


@dataclass
class TrainConfig:
    """Settings of DDQ training: of ``DDQTrainer`` and of the ``train_ddq`` loop.

    Args:
        epochs: total DDQ epochs, including ``freeze_epochs``.
        lr, momentum, weight_decay: SGD on the model's weights (cosine schedule).
        lr_levels: Adam on the quantizers' level parameters (cosine schedule). Adam moves
            every parameter by about this much per step however weak its gradient, so it
            is small: at 0.001 the levels move at the weights' pace and stay near their
            data-driven fit; at 0.01 they random-walk away from it (BENCHMARKS.md, level
            learning).
        lr_gates: Adam on the gate logits (constant).
        dual_step: step of the Lagrange multiplier's dual ascent.
        anneal: fraction of the learning phase (before the fit) over which the effective
            target moves from the initial cost to the budget.
        track_slack: opt-in: while learning, close bits as soon as the cost exceeds the
            effective target by this fraction (``BudgetTracker``). ``None`` (default)
            leaves the learning phase to the multiplier and the final fit: on the MNIST
            benchmark tracking cost 1.8 pt at a 4-bit size and gained 1.0 pt at 3 bits
            (one seed each), see BENCHMARKS.md.
        freeze_epochs: final epochs trained at fixed bits, after the budget fit.
        calib_batches: batches used to calibrate activation ranges.
        calib_method: ``"mse"`` (default) or ``"percentile"``, see ``ddq.calibrate``.
        fit_batches: batches whose gate gradients rank bits in the budget fit.
        max_steps_per_epoch: cap on steps per epoch (quick runs and tests).
        grad_clip: opt-in: before every optimizer step, scale the gradients of everything
            the step updates (weights, levels and gate logits together) so that their
            global L2 norm is at most this value (``DDQTrainer.clip_gradients``, i.e.
            ``torch.nn.utils.clip_grad_norm_``). ``None`` (default) leaves them as they are.
            It guards the first steps of low-bit training, where a quantized model can
            start far from its float minimum and produce very large gradients.
        seed: seeds data order, dropout and initialisation per epoch (resumable).
        progress: show progress bars.
    """

    epochs: int = 6
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-5
    lr_levels: float = 0.001
    lr_gates: float = 0.01
    dual_step: float = 0.05
    anneal: float = 0.5
    track_slack: float | None = None
    freeze_epochs: int = 1
    calib_batches: int = 8
    calib_method: str = "mse"
    fit_batches: int = 8
    max_steps_per_epoch: int | None = None
    grad_clip: float | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""

        def integer(key: str, low: int, optional: bool = False) -> None:
            v = getattr(self, key)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                what = f"an integer >= {low}" + (" or null" if optional else "")
                raise ValueError(f"TrainConfig.{key} must be {what}, got {v!r}")

        def number(key: str, low: float, high: float = math.inf, optional: bool = False) -> None:
            v = getattr(self, key)
            if optional and v is None:
                return
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not math.isfinite(v)
                or not low <= v <= high
            ):
                span = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
                what = f"a finite number {span}" + (" or null" if optional else "")
                raise ValueError(f"TrainConfig.{key} must be {what}, got {v!r}")

        integer("epochs", 1)
        integer("freeze_epochs", 0)
        if self.freeze_epochs > self.epochs:
            raise ValueError(
                f"TrainConfig.freeze_epochs must be in 0..epochs ({self.epochs}), "
                f"got {self.freeze_epochs}"
            )
        for key in ("lr", "weight_decay", "lr_levels", "lr_gates", "dual_step"):
            number(key, 0.0)
        number("momentum", 0.0, 1.0)
        number("anneal", 0.0, 1.0)
        number("track_slack", 0.0, optional=True)
        integer("calib_batches", 1)
        if self.calib_method not in ("percentile", "mse"):
            raise ValueError(
                f"TrainConfig.calib_method must be 'percentile' or 'mse', got {self.calib_method!r}"
            )
        integer("fit_batches", 0)
        integer("max_steps_per_epoch", 1, optional=True)
        clip = self.grad_clip
        if clip is not None and (
            isinstance(clip, bool)
            or not isinstance(clip, int | float)
            or not math.isfinite(clip)
            or clip <= 0
        ):
            raise ValueError(
                f"TrainConfig.grad_clip must be a finite number > 0 or null, got {clip!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"TrainConfig.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.progress, bool):
            raise ValueError(f"TrainConfig.progress must be true or false, got {self.progress!r}")


class DDQTrainer:
    """The DDQ lifecycle around a training loop you write: calibrate, penalise, step, finalize.

    Construction applies the budget (the activation cap and a feasibility check,
    ``ValueError`` if the budget cannot be met) to a model already prepared with
    ``ddq.prepare``. Then, in your loop:

    1. ``calibrate(batches)``: fit every quantizer to a few batches of your data.
    2. Each step, add ``penalty()`` to your loss (or wrap it: ``loss(task_loss)``): the
       budget constraint ``lambda (cost / target - 1)``; zero once the bits are fixed.
       After ``backward()``, ``clip_gradients()`` applies ``config.grad_clip`` (a no-op
       when it is ``None``).
    3. After the optimizer step, ``step()``: the dual-ascent update of ``lambda``, the
       annealing of the target from the initial cost to the budget, and the opt-in
       ``BudgetTracker`` (``config.track_slack``).
    4. ``finalize(batches, loss_fn)``: close (or reopen) bits until the budget is met,
       ranked by the gate logits and the gate gradients of your ``loss_fn(model, batch)``
       over ``config.fit_batches`` batches, then freeze every bitwidth. Train on at fixed
       bits if you like (``config.freeze_epochs`` in ``train_ddq``); the budget holds.

    ``optimizer()`` gives the suggested optimizers (SGD on the weights, Adam on the
    levels and gates, cosine schedule over ``config.epochs * steps_per_epoch``);
    ``split_parameters`` gives the three parameter groups for your own. ``state_dict()``
    and ``load_state_dict()`` resume the trainer (with the model's and the optimizer's own).

    Args:
        model: the prepared model (not a DDP wrapper; wrap it yourself for the forward).
        budget: the ``Budget`` to meet.
        config: a ``TrainConfig``; its optimizer, constraint, annealing, calibration and
            fit settings are used (``epochs``, ``freeze_epochs`` and ``steps_per_epoch``
            set the annealing and schedule lengths; the loop itself is yours).
        steps_per_epoch: optimizer steps per epoch in your loop.

    Example:
        >>> trainer = DDQTrainer(model, Budget(avg_weight_bits=4), TrainConfig(epochs=3),
        ...                      steps_per_epoch=len(loader))   # doctest: +SKIP
        >>> trainer.fit_step   # finalize before this step: the start of the freeze epochs
        128
    """

    def __init__(
        self,
        model: nn.Module,
        budget: Budget,
        config: TrainConfig | None = None,
        *,
        steps_per_epoch: int,
    ) -> None:
        cfg = TrainConfig() if config is None else config
        if not isinstance(cfg, TrainConfig):
            raise ValueError(f"config must be a TrainConfig, got {type(cfg).__name__}")
        if not isinstance(budget, Budget):
            raise ValueError(f"budget must be a Budget, got {type(budget).__name__}")
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int):
            raise ValueError(f"steps_per_epoch must be an integer, got {steps_per_epoch!r}")
        if steps_per_epoch < 0:
            raise ValueError(f"steps_per_epoch must be >= 0, got {steps_per_epoch}")
        self.model = model
        self.budget = budget
        self.config = cfg
        self.steps_per_epoch = steps_per_epoch
        self.cost_model = CostModel(model)
        budget.apply(model, self.cost_model)  # activation cap + feasibility, before training
        self.constraint = BudgetConstraint(budget, self.cost_model, step=cfg.dual_step)
        self.tracker = (
            BudgetTracker(model, budget, self.cost_model, slack=cfg.track_slack)
            if cfg.track_slack is not None
            else None
        )
        self.steps = 0
        self.fitted = False
        self.fit_actions: list[FitAction] = []
        self._sync_progress()

    # -- schedule -----------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        """``epochs * steps_per_epoch``: the length of the cosine learning-rate schedule."""
        return max(self.config.epochs * self.steps_per_epoch, 1)

    @property
    def fit_step(self) -> int:
        """The step before which to ``finalize``: the end of the learning phase."""
        return (self.config.epochs - self.config.freeze_epochs) * self.steps_per_epoch

    @property
    def _anneal_steps(self) -> float:
        fit_epoch = self.config.epochs - self.config.freeze_epochs
        return max(self.config.anneal * fit_epoch * self.steps_per_epoch, 1e-9)

    def _sync_progress(self) -> None:
        self.constraint.set_progress(self.steps / self._anneal_steps)

    @property
    def should_finalize(self) -> bool:
        """True once the learning phase is over and ``finalize`` has not run."""
        return not self.fitted and self.steps >= self.fit_step

    # -- the lifecycle ------------------------------------------------------------------
    def calibrate(
        self, batches: Iterable[Any], num_batches: int | None = None, **kwargs: Any
    ) -> int:
        """Fit every quantizer to ``num_batches`` (default ``config.calib_batches``) batches.

        ``ddq.calibrate`` with ``config.calib_method``; see it for the batch structures
        accepted and the other options (``kwargs``). Returns the number of input
        quantizers calibrated from data.
        """
        n = self.config.calib_batches if num_batches is None else num_batches
        return calibrate(self.model, batches, n, method=self.config.calib_method, **kwargs)

    def optimizer(self) -> DDQOptimizer:
        """The suggested optimizers: SGD on the weights, Adam on the levels and gates.

        Learning rates, momentum and weight decay from the config; cosine schedule over
        ``total_steps`` (the gates' rate stays constant). Create it after ``calibrate``.
        """
        return DDQOptimizer(self.model, self.config, total_steps=self.total_steps)

    def penalty(self) -> torch.Tensor:
        """The budget term to add to the task loss this step (zero once bits are fixed)."""
        if self.fitted:
            p = next(self.model.parameters(), None)
            return torch.zeros((), device=p.device if p is not None else None)
        return self.constraint.penalty()

    def loss(self, task_loss: torch.Tensor) -> torch.Tensor:
        """``task_loss + penalty()`` while bits learn, ``task_loss`` once they are fixed."""
        return task_loss if self.fitted else task_loss + self.constraint.penalty()

    def clip_gradients(self) -> torch.Tensor | None:
        """Clip the global gradient norm to ``config.grad_clip``; call between ``backward()``
        and the optimizer step.

        Every parameter of the model that has a gradient (weights, quantizer levels, gate
        logits: what the step updates) is scaled together by
        ``torch.nn.utils.clip_grad_norm_``, so the direction of the update is kept.
        Returns the total norm before clipping, or ``None`` (and touches nothing) when
        ``config.grad_clip`` is ``None``. Under DDP call it after ``backward()`` as well:
        the gradients are already averaged there, so every process clips alike.
        """
        if self.config.grad_clip is None:
            return None
        params = [p for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)

    def step(self) -> None:
        """Call once after every optimizer step (gradients still in place).

        While bits learn: fold the gate gradients into the tracker (opt-in), one dual
        ascent step on ``lambda``, close bits if the tracker finds the cost ahead of the
        annealed target; then advance the annealing by one step.
        """
        if not self.fitted:
            if self.tracker is not None:
                self.tracker.observe()
            self.constraint.update()
            if self.tracker is not None:
                self.tracker.enforce(self.constraint.target)
        self.steps += 1
        self._sync_progress()

    def gate_gradients(
        self,
        batches: Iterable[Any],
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        num_batches: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Gradients of ``loss_fn(model, batch)`` on every gate logit, summed over batches.

        The model is in eval mode meanwhile (no BatchNorm statistics update, no dropout);
        the model's gradients are cleared before and after. Outside DDP only the gate
        logits require gradients meanwhile: the same gate gradients, without the weight
        gradients' memory (4 bytes per weight) and their share of the backward pass. (DDP's
        reducer expects a gradient for every parameter it was built with, so under
        ``torch.distributed`` nothing is switched off.)
        """
        n = self.config.fit_batches if num_batches is None else num_batches
        model = self.model
        qs = quantizers_of(model)
        model.zero_grad(set_to_none=True)
        was = model.training
        gates = {id(q.gate_logits) for q in qs.values()}
        paused = []
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            paused = [p for p in model.parameters() if p.requires_grad and id(p) not in gates]
        for p in paused:
            p.requires_grad_(False)
        model.eval()
        try:
            for i, batch in enumerate(batches):
                if i >= n:
                    break
                loss_fn(model, batch).backward()
        finally:
            model.train(was)
            for p in paused:
                p.requires_grad_(True)
        grads = {
            name: q.gate_logits.grad.detach().clone()
            for name, q in qs.items()
            if q.gate_logits.grad is not None
        }
        model.zero_grad(set_to_none=True)
        return grads

    def finalize(
        self,
        batches: Iterable[Any] | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        num_batches: int | None = None,
    ) -> list[FitAction]:
        """Meet the budget exactly, then freeze every bitwidth; returns the bits moved.

        The bits training pushed lowest are closed (or the most useful reopened) by
        ``fit_to_budget``; ties are broken by the gate gradients of ``loss_fn(model,
        batch)`` (your own task loss, a scalar) over ``num_batches`` (default
        ``config.fit_batches``) of ``batches``. Without batches the gate logits alone rank
        the bits. A second call does nothing and returns the first call's actions.
        Under DDP, let ``loss_fn`` run your DDP wrapper so the gradients agree on every
        process.
        """
        if self.fitted:
            return self.fit_actions
        grads: dict[str, torch.Tensor] = {}
        if batches is not None:
            if loss_fn is None:
                raise ValueError("finalize(batches, loss_fn): loss_fn(model, batch) is needed")
            grads = self.gate_gradients(batches, loss_fn, num_batches)
        self.fit_actions = fit_to_budget(self.model, self.budget, self.cost_model, grads)
        for q in quantizers_of(self.model).values():
            q.set_bits(q.bits, trainable=False)
        self.fitted = True
        return self.fit_actions

    # -- reporting ----------------------------------------------------------------------
    @property
    def lam(self) -> float:
        """The Lagrange multiplier now."""
        return self.constraint.lam

    def usage(self) -> float:
        """Budgeted quantity / budget now: at most 1.0 after ``finalize``."""
        return self.budget.usage(self.cost_model)

    # -- resume -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The trainer's state (not the model's or the optimizer's: save those too)."""
        return {
            "steps": self.steps,
            "constraint": self.constraint.state_dict(),
            "tracker": self.tracker.state_dict() if self.tracker is not None else None,
            "fitted": self.fitted,
            "fit_actions": [dataclasses.asdict(a) for a in self.fit_actions],
            "budget": self.budget.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` (load the model's state dict as well: the bits live there)."""
        if "budget" in state and state["budget"] != self.budget.to_dict():
            raise ValueError(
                f"cannot load a trainer state for budget {state['budget']} into one for "
                f"{self.budget.to_dict()}"
            )
        self.steps = int(state["steps"])
        self.constraint.load_state_dict(state["constraint"])
        if self.tracker is not None and state.get("tracker") is not None:
            self.tracker.load_state_dict(state["tracker"])
        self.fitted = bool(state["fitted"])
        self.fit_actions = [FitAction(**a) for a in state["fit_actions"]]
        self._sync_progress()
