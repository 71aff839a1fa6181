"""Named ``DDQConfig`` presets: which parts are adaptive, chosen for where the model runs.

=========== ========================= =============================== =====================
preset      weights                   activations                     deploys as
=========== ========================= =============================== =====================
adaptive    learned levels, per chan. learned levels (thresholds)     packed artifact (LUT);
                                                                      ONNX in float
int8        learned levels, per chan. uniform integer grid            ONNX at int8 speed:
                                                                      levels mapped onto
                                                                      per-channel int8 codes
uniform     integer grid, per chan.   uniform integer grid            ONNX at int8 speed,
                                                                      exactly as trained
=========== ========================= =============================== =====================

All three keep the budget, the learned bitwidths and the packed ``b``-bit artifact; they
differ in the level family of each quantizer, and ``int8`` and ``uniform`` also set
``integer_graph`` (the output quantizers an all-integer ONNX graph needs).
``DDQConfig()`` is ``adaptive``: it is the method itself and the most accurate; choose
``int8`` when the model must run on an integer runtime.

Example:
    >>> preset("int8").activation.mode, preset("int8").weight.mode
    ('uniform', 'adaptive')
    >>> preset("uniform", first_last_bits="learn").first_last_bits
    'learn'
"""

from __future__ import annotations

from typing import Any

from .config import DDQConfig

__all__ = ["PRESETS", "preset"]

PRESETS: dict[str, dict[str, Any]] = {
    "adaptive": {"weight": "adaptive", "activation": "adaptive", "integer_graph": False},
    "int8": {"weight": "adaptive", "activation": "uniform", "integer_graph": True},
    "uniform": {"weight": "uniform", "activation": "uniform", "integer_graph": True},
}


def preset(name: str, **changes: Any) -> DDQConfig:
    """The ``DDQConfig`` of preset ``name`` (see the module docstring), with ``changes``
    applied to its fields (e.g. ``first_last_bits=...``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    modes = PRESETS[name]
    base = DDQConfig(**{"integer_graph": modes["integer_graph"], **changes})
    if base.weight is not None:
        base.weight = base.weight.replace(f"preset {name!r}", mode=modes["weight"])
    if base.activation is not None:
        base.activation = base.activation.replace(f"preset {name!r}", mode=modes["activation"])
    base.validate()
    return base
