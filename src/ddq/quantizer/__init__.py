"""The DDQ quantizer: levels, ordered precision gates, Kronecker merge, lookup."""

from .gates import ordered_gates
from .lookup import AdaptiveIndexer, UniformIndexer, table_lookup
from .merge import kronecker_merge
from .observer import RangeObserver
from .quantizer import MODES, DDQQuantizer, snap_to_grid

__all__ = [
    "MODES",
    "AdaptiveIndexer",
    "DDQQuantizer",
    "RangeObserver",
    "UniformIndexer",
    "kronecker_merge",
    "ordered_gates",
    "snap_to_grid",
    "table_lookup",
]
