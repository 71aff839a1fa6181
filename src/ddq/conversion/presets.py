"""Named ``DDQConfig`` presets: which parts are adaptive, chosen for where the model runs.

=========== ========================= =============================== =====================
preset      weights                   activations                     deploys as
=========== ========================= =============================== =====================
adaptive    learned levels, per chan. learned levels (thresholds)     packed artifact (LUT);
                                                                      ONNX in float
int8        learned levels on the     uniform integer grid            ONNX at int8 speed:
            int8 grid, per chan.                                      levels are per-channel
                                                                      int8 codes, exactly
                                                                      as trained
uniform     integer grid, per chan.   uniform integer grid            ONNX at int8 speed,
                                                                      exactly as trained
=========== ========================= =============================== =====================

All three keep the budget, the learned bitwidths and the packed ``b``-bit artifact; they
differ in the level family of each quantizer, and ``int8`` and ``uniform`` also set
``integer_graph`` (the output quantizers an all-integer ONNX graph needs). ``int8``'s
weight levels are free but trained on the int8 grid of their peak
(``QuantizerConfig.level_grid=8``), so the export's one int8 code per level
(``ddq.deploy.int8_codes``) is the trained weight, not an approximation of it.
``DDQConfig()`` is ``adaptive``: it is the method itself and the most accurate; choose
``int8`` when the model must run on an integer runtime.

Example:
    >>> preset("int8").activation.mode, preset("int8").weight.mode
    ('uniform', 'adaptive')
    >>> preset("int8").weight.level_grid, preset("adaptive").weight.level_grid
    (8, None)
    >>> preset("uniform", first_last_bits="learn").first_last_bits
    'learn'
"""

from __future__ import annotations

from typing import Any

from .config import DDQConfig

__all__ = ["PRESETS", "apply_preset", "preset"]

#: Per preset: the weight and activation modes, the weights' ``level_grid`` and
#: ``integer_graph``.
PRESETS: dict[str, dict[str, Any]] = {
    "adaptive": {
        "weight": "adaptive",
        "activation": "adaptive",
        "weight_level_grid": None,
        "integer_graph": False,
    },
    "int8": {
        "weight": "adaptive",
        "activation": "uniform",
        # The export maps the levels onto int8 codes; trained on that grid, they map exactly.
        "weight_level_grid": 8,
        "integer_graph": True,
    },
    "uniform": {
        "weight": "uniform",
        "activation": "uniform",
        "weight_level_grid": None,
        "integer_graph": True,
    },
}


def preset(name: str, **changes: Any) -> DDQConfig:
    """The ``DDQConfig`` of preset ``name`` (see the module docstring), with ``changes``
    applied to its fields (e.g. ``first_last_bits=...``)."""
    config = apply_preset(DDQConfig(**changes), name)
    if "integer_graph" in changes:  # an explicit change wins over the preset's choice
        config.integer_graph = changes["integer_graph"]
    config.validate()
    return config


def apply_preset(config: DDQConfig, name: str) -> DDQConfig:
    """``config`` (modified in place and returned) with preset ``name``'s level families
    (modes, and the weights' ``level_grid``) and ``integer_graph``; every other field is
    kept.

    Example:
        >>> apply_preset(DDQConfig(first_last_bits="learn"), "int8").weight.level_grid
        8
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    modes = PRESETS[name]
    if config.weight is not None:
        config.weight = config.weight.replace(
            f"preset {name!r}", mode=modes["weight"], level_grid=modes["weight_level_grid"]
        )
    if config.activation is not None:
        config.activation = config.activation.replace(f"preset {name!r}", mode=modes["activation"])
    config.integer_graph = modes["integer_graph"]
    return config
