"""Training: calibration, the DDQ lifecycle (``DDQTrainer``) and the loop over it with its
budget constraint, checkpoints, the run pipeline."""

from .calibrate import calibrate
from .checkpoint import load_checkpoint, save_checkpoint
from .lifecycle import DDQTrainer, TrainConfig
from .loop import TrainResult, evaluate, top1_accuracy, train_ddq, train_float
from .optim import DDQOptimizer, split_parameters

__all__ = [
    "DDQOptimizer",
    "DDQTrainer",
    "TrainConfig",
    "TrainResult",
    "calibrate",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
    "split_parameters",
    "top1_accuracy",
    "train_ddq",
    "train_float",
]
