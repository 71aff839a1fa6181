"""Model conversion: configuration, ``prepare``, ``calibrate`` and ``summary``."""

from .calibrate import calibrate, reestimate_batchnorm
from .config import CONFIG_VERSION, DDQConfig, QuantizerConfig
from .macs import count_macs, quantizers_disabled
from .prepare import DDQState, prepare, state_of
from .summary import Summary, summary

__all__ = [
    "CONFIG_VERSION",
    "DDQConfig",
    "DDQState",
    "QuantizerConfig",
    "Summary",
    "calibrate",
    "count_macs",
    "prepare",
    "quantizers_disabled",
    "reestimate_batchnorm",
    "state_of",
    "summary",
]
