"""Model conversion: configuration, ``prepare``, ``calibrate`` and ``summary``."""

from .calibrate import calibrate, reestimate_batchnorm
from .config import CONFIG_VERSION, DDQConfig, QuantizerConfig
from .macs import count_macs, quantizers_disabled
from .prepare import DDQState, prepare, state_of
from .presets import PRESETS, preset
from .summary import Summary, summary

__all__ = [
    "CONFIG_VERSION",
    "PRESETS",
    "DDQConfig",
    "DDQState",
    "QuantizerConfig",
    "Summary",
    "calibrate",
    "count_macs",
    "prepare",
    "preset",
    "quantizers_disabled",
    "reestimate_batchnorm",
    "state_of",
    "summary",
]
