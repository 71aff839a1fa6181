"""``Budget``: what the user asks for, in bytes, average bits or BitOps."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..layers import QuantLayer, quantizers_of
from ..quantizer import DDQQuantizer
from .cost import CostModel

__all__ = ["Budget", "learnable_quantizers"]

_KINDS = ("avg_weight_bits", "size_bytes", "size_ratio", "gbitops")
_UNITS = {
    "avg_weight_bits": "bits",
    "size_bytes": "bytes",
    "size_ratio": "bytes",
    "gbitops": "GBitOps",
}


def learnable_quantizers(model: nn.Module) -> dict[str, DDQQuantizer]:
    """Quantizers whose bitwidth can still move (floor below ceiling)."""
    return {n: q for n, q in quantizers_of(model).items() if int(q.floor) < int(q.ceiling)}


@contextmanager
def _all_at_floor(model: nn.Module) -> Iterator[None]:
    qs = learnable_quantizers(model).values()
    saved = [q.gate_logits.detach().clone() for q in qs]
    try:
        for q in qs:
            q.set_bits(int(q.floor), trainable=True)
        yield
    finally:
        with torch.no_grad():
            for q, s in zip(qs, saved, strict=True):
                q.gate_logits.copy_(s)


@dataclass
class Budget:
    """A hard budget: exactly one of the four targets, plus an optional activation-bit cap.

    Args:
        avg_weight_bits: average weight bitwidth over quantized layers (4.0 = the size of
            a uniform 4-bit model).
        size_bytes: model size in bytes (quantized weights at their bits, every other
            parameter at 32 bits).
        size_ratio: model size as a fraction of the FP32 model (0.125 = 8x smaller).
        gbitops: sum of MACs x weight bits x activation bits, in units of 1e9.
        max_act_bits: cap on every learnable activation quantizer's bitwidth.

    Example:
        >>> Budget(avg_weight_bits=4, max_act_bits=4).describe()
        'average weight bits <= 4 (activations <= 4 bits)'
    """

    avg_weight_bits: float | None = None
    size_bytes: float | None = None
    size_ratio: float | None = None
    gbitops: float | None = None
    max_act_bits: int | None = None

    def __post_init__(self) -> None:
        for k in _KINDS:
            v = getattr(self, k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"budget {k} must be a number, got {type(v).__name__} {v!r}")
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"budget {k} must be a positive finite number, got {v!r}")
        set_ = [k for k in _KINDS if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"a Budget needs exactly one of {_KINDS}, got {set_ or 'none'}")
        cap = self.max_act_bits
        if cap is not None and not (isinstance(cap, int) and not isinstance(cap, bool)):
            raise ValueError(
                f"budget max_act_bits must be an integer in 1..8 or null, got "
                f"{type(cap).__name__} {cap!r}"
            )
        if cap is not None and not 1 <= cap <= 8:
            raise ValueError(f"budget max_act_bits must be an integer in 1..8, got {cap!r}")

    @classmethod
    def from_dict(cls, d: Any) -> Budget:
        """Inverse of ``to_dict``; unknown keys or wrong types raise ``ValueError``.

        Example:
            >>> Budget.from_dict({"size_ratio": 0.125}).describe()
            'size / FP32 <= 0.125'
        """
        if not isinstance(d, Mapping):
            raise ValueError(
                f"a budget must be a mapping such as {{'avg_weight_bits': 4}}, got "
                f"{type(d).__name__} {d!r}"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted((k for k in d if k not in names), key=repr)
        if unknown:
            raise ValueError(f"unknown budget key(s) {unknown}; known: {names}")
        return cls(**d)

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) is not None)

    @property
    def value(self) -> float:
        return float(getattr(self, self.kind))

    def describe(self) -> str:
        names = {
            "avg_weight_bits": "average weight bits",
            "size_bytes": "size bytes",
            "size_ratio": "size / FP32",
            "gbitops": "GBitOps",
        }
        cap = f" (activations <= {self.max_act_bits} bits)" if self.max_act_bits else ""
        return f"{names[self.kind]} <= {self.value:g}{cap}"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    # -- measurement, in the budget's own units
    def measure(self, cm: CostModel) -> torch.Tensor:
        """The budgeted quantity now (differentiable in the gates)."""
        if self.kind == "avg_weight_bits":
            return cm.weight_bits_sum() / max(cm.quant_weight_elements, 1)
        if self.kind == "gbitops":
            return cm.bitops() / 1e9
        return cm.size_bits() / 8

    def target(self, cm: CostModel) -> float:
        if self.kind == "size_ratio":
            return self.value * cm.fp32_bytes()
        return self.value

    def usage(self, cm: CostModel) -> float:
        """measure / target: 1.0 is exactly at budget."""
        return float(self.measure(cm).detach()) / self.target(cm)

    def unit_cost(self, cm: CostModel, name: str, q: DDQQuantizer) -> float:
        """How much one more bit of quantizer ``q`` adds to the budgeted quantity."""
        layer_name, _, role = name.rpartition(".")
        if role not in ("weight_quantizer", "input_quantizer"):
            # integer_graph's output quantizers: no MACs and no stored bits, so neither
            # BitOps nor size nor average weight bits depend on them.
            return 0.0
        lc = next((lc for lc in cm.layers if lc.name == layer_name), None)
        if lc is None:
            raise ValueError(f"quantizer {name!r} belongs to no layer of the cost model")
        if self.kind == "gbitops":
            other = lc.a_bits() if role == "weight_quantizer" else lc.w_bits()
            return lc.macs * float(other.detach()) / 1e9
        if role != "weight_quantizer":
            return 0.0
        if self.kind == "avg_weight_bits":
            return lc.weight_elements / max(cm.quant_weight_elements, 1)
        return lc.weight_elements / 8

    # -- set-up checks
    def apply(self, model: nn.Module, cm: CostModel) -> None:
        """Apply the activation cap, then check feasibility (``ValueError`` if not).

        The cap applies to learnable input quantizers; the first/last-layer convention
        (fixed bits) is left as it is and stated in reports.
        """
        if self.max_act_bits is not None:
            from ..conversion.output_quantizers import output_quantizers

            act_qs = [m.input_quantizer for m in model.modules() if isinstance(m, QuantLayer)]
            # integer_graph's output quantizers are activation quantizers too.
            act_qs += [q for q in output_quantizers(model).values() if isinstance(q, DDQQuantizer)]
            for q in act_qs:
                if q is not None and int(q.floor) < int(q.ceiling) > self.max_act_bits:
                    if self.max_act_bits < int(q.floor):
                        raise ValueError(
                            f"max_act_bits={self.max_act_bits} is below the min_bits "
                            f"({int(q.floor)}) of {q.name!r}"
                        )
                    q.set_max_bits_cap(self.max_act_bits)
        with _all_at_floor(model):
            smallest = float(self.measure(cm).detach())
        if smallest > self.target(cm) * (1 + 1e-9):
            smallest_user = smallest / cm.fp32_bytes() if self.kind == "size_ratio" else smallest
            raise ValueError(
                f"budget {self.describe()} cannot be met: with every learnable layer at its "
                f"min_bits the model needs {self.kind}={smallest_user:.6g} "
                f"({_UNITS[self.kind]}); that is the smallest feasible value"
            )
