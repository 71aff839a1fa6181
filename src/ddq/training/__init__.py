"""Training: calibration, the DDQ loop with its budget constraint, checkpoints, the run pipeline."""

from .calibrate import calibrate
from .checkpoint import load_checkpoint, save_checkpoint
from .loop import TrainConfig, TrainResult, evaluate, train_ddq, train_float

__all__ = [
    "TrainConfig",
    "TrainResult",
    "calibrate",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
    "train_ddq",
    "train_float",
]
