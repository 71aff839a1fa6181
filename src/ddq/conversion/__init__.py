"""Model conversion: configuration, ``prepare`` and ``summary``."""

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
    "count_macs",
    "prepare",
    "quantizers_disabled",
    "state_of",
    "summary",
]
