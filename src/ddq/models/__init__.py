"""Models for ddq: a timm-like registry and safe weight loading.

Built-in models: ``small_cnn``, ``resnet18`` and ``mobilenet_v2`` (torchvision, randomly
initialized; ddq never downloads weights).

Example:
    >>> from ddq.models import create_model, load_weights, save_weights
    >>> model = create_model("resnet18", num_classes=10, in_channels=1, small_input=True)
"""

from ddq.models import small_cnn as small_cnn
from ddq.models import torchvision_models as torchvision_models
from ddq.models.registry import create_model, list_models, register_model
from ddq.models.small_cnn import SmallCNN
from ddq.models.weights import load_weights, save_weights

__all__ = [
    "SmallCNN",
    "create_model",
    "list_models",
    "load_weights",
    "register_model",
    "save_weights",
]
