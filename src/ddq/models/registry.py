"""Model registry (timm-like).

A model builder is a function ``builder(num_classes, in_channels, small_input, **kw)``
returning an ``nn.Module``, registered under a short name with :func:`register_model`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["create_model", "list_models", "register_model"]

ModelBuilder = Callable[..., nn.Module]

_MODELS: dict[str, ModelBuilder] = {}

# Importing these modules registers the built-in models; done lazily so that importing
# ``ddq.models.registry`` on its own still lists every built-in name.
_BUILTIN_MODULES = ("ddq.models.small_cnn", "ddq.models.torchvision_models")


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a model builder under ``name`` (decorator).

    The builder is called as ``builder(num_classes=..., in_channels=..., small_input=...,
    **kw)`` and must return an ``nn.Module`` mapping ``(N, in_channels, H, W)`` images to
    ``(N, num_classes)`` logits.

    Example:
        >>> @register_model("tiny_linear")
        ... def _tiny(num_classes=10, in_channels=3, small_input=False):
        ...     return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def decorator(fn: ModelBuilder) -> ModelBuilder:
        existing = _MODELS.get(name)
        # Same function re-registered (module reloaded) is fine; a different builder under an
        # existing name would silently shadow it, so refuse.
        if existing is not None and (existing.__module__, existing.__qualname__) != (
            fn.__module__,
            fn.__qualname__,
        ):
            raise ValueError(f"model {name!r} is already registered by {existing.__module__}")
        _MODELS[name] = fn
        return fn

    return decorator


def _ensure_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def list_models() -> list[str]:
    """Return the sorted names of all registered models.

    Example:
        >>> list_models()[:3]
        ['mobilenet_v2', 'resnet18', 'small_cnn']
    """
    _ensure_builtins()
    return sorted(_MODELS)


def create_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    small_input: bool = False,
    **kw: Any,
) -> nn.Module:
    """Build a freshly initialized registered model (never downloads pretrained weights).

    Args:
        name: registry name; see :func:`list_models`.
        num_classes: size of the output logits.
        in_channels: channels of the input images (1 for MNIST, 3 for RGB).
        small_input: adapt the stem for 28x28 / 32x32 images (less early downsampling).
        **kw: model-specific options (e.g. ``width_mult`` for ``mobilenet_v2``).

    Raises:
        ValueError: unknown ``name`` (the message lists the available names) or bad sizes.

    Example:
        >>> import torch
        >>> model = create_model("small_cnn", num_classes=10, in_channels=1)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    _ensure_builtins()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(sorted(_MODELS))}")
    if num_classes < 1 or in_channels < 1:
        raise ValueError(
            f"num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}"
        )
    return _MODELS[name](
        num_classes=num_classes, in_channels=in_channels, small_input=small_input, **kw
    )
