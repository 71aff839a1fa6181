"""``ddq.summary``: what each layer got, as rows of plain data and as a table."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..layers import QuantLayer, kind_of, role_of
from .macs import count_macs
from .prepare import state_of

logger = logging.getLogger(__name__)

__all__ = ["Summary", "summary"]

_COLUMNS = ("name", "type", "params", "macs", "w_bits", "a_bits", "mode", "note")


class Summary(list):
    """A list of per-layer dicts whose ``str`` is an aligned text table."""

    def table(self) -> str:
        rows = [[str(r.get(c, "")) for c in _COLUMNS] for r in self]
        widths = [
            max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
            for i, c in enumerate(_COLUMNS)
        ]
        line = "  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths, strict=True))
        out = [line, "-" * len(line)]
        out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        total_p = sum(r["params"] for r in self)
        total_m = sum(r["macs"] or 0 for r in self)
        out.append(f"total: {total_p:,} params, {total_m:,} MACs per sample")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def summary(model: nn.Module, example_inputs: Any = None, print_table: bool = False) -> Summary:
    """Per-layer name, type, parameters, MACs, weight/activation bits and mode.

    Quantized layers and the conv/linear layers left float are listed in module
    (registration) order. ``macs`` is per sample, from ``example_inputs``
    if given, else from the example inputs given to ``prepare`` (``None`` if neither).
    ``print_table=True`` also logs the table and the conventions (``logging``, INFO, the
    ``ddq`` logger, which the CLI shows).

    Example:
        >>> rows = summary(prepared_model)            # doctest: +SKIP
        >>> print(rows)                                # the table
        >>> rows[0]["w_bits"], rows[0]["a_bits"]
    """
    state = state_of(model)
    macs = count_macs(model, example_inputs)[0] if example_inputs is not None else None
    float_why = {n: why for n, _, why in state.float_layers}
    rows = Summary()
    for name, m in model.named_modules():
        if kind_of(m) is None and name not in float_why:
            continue
        params = sum(p.numel() for p in m.parameters(recurse=False))
        layer_macs = macs.get(name) if macs is not None else getattr(m, "macs", None)
        row: dict[str, Any] = {
            "name": name,
            "type": type(m).__name__.removeprefix("Quant"),
            "kind": role_of(m),
            "params": params,
            "weight_elements": m.weight.numel() if hasattr(m, "weight") else 0,
            "macs": layer_macs,
        }
        if isinstance(m, QuantLayer):
            wq, aq = m.weight_quantizer, m.input_quantizer
            row.update(
                w_bits=wq.bits,
                a_bits=aq.bits if aq is not None else 32,
                mode=wq.mode,
                w_signed=wq.signed,
                a_signed=aq.signed if aq is not None else None,
                note="fixed (first/last convention)"
                if name in (state.first, state.last)
                and isinstance(state.config.first_last_bits, int)
                else "",
            )
        else:
            row.update(
                w_bits=32,
                a_bits=32,
                mode="float",
                w_signed=None,
                a_signed=None,
                note=float_why.get(name, "float"),
            )
        rows.append(row)
    if print_table:
        logger.info("%s\nconventions: %s", rows.table(), state.conventions())
    return rows
