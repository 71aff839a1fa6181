"""ddq: Differentiable Dynamic Quantization for PyTorch.

Every layer learns its own bitwidth, dynamic range and quantization levels by gradient
descent, under a budget stated in bytes or BitOps.

Example:
    >>> import torch, torchvision, ddq
    >>> model = torchvision.models.mobilenet_v2(num_classes=10)
    >>> ddq.prepare(model, ddq.DDQConfig(), example_inputs=torch.zeros(1, 3, 224, 224))
    >>> print(ddq.summary(model))
"""

from .budget import Budget, CostModel
from .conversion import DDQConfig, QuantizerConfig, calibrate, prepare, summary
from .deploy import export, export_onnx, load
from .layers import QuantConv1d, QuantConv2d, QuantLinear
from .quantizer import DDQQuantizer
from .training.lifecycle import DDQTrainer, TrainConfig

__version__ = "0.1.0"
__all__ = [
    "Budget",
    "CostModel",
    "DDQConfig",
    "DDQQuantizer",
    "DDQTrainer",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantizerConfig",
    "TrainConfig",
    "__version__",
    "calibrate",
    "export",
    "export_onnx",
    "load",
    "prepare",
    "summary",
]
