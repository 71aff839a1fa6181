"""Training: the DDQ lifecycle (``DDQTrainer``), the loop over it (``train_ddq``) with its
budget constraint, optimizer groups, checkpoints and progress."""

from .checkpoint import load_checkpoint, save_checkpoint
from .lifecycle import DDQTrainer, TrainConfig
from .loop import TrainResult, evaluate, top1_accuracy, train_ddq, train_float
from .optim import DDQOptimizer, split_parameters

__all__ = [
    "DDQOptimizer",
    "DDQTrainer",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
    "split_parameters",
    "top1_accuracy",
    "train_ddq",
    "train_float",
]
