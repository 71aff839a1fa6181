"""Models shared by the training tests (the lifecycle and gradient-clipping ones)."""

from __future__ import annotations

import torch
from torch import nn

import ddq
from ddq import DDQConfig
from ddq.models import create_model


def prepared_small_cnn() -> nn.Module:
    """The MNIST ``small_cnn``, seeded and prepared with learned first/last-layer bits, so
    two calls give identical models."""
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1, small_input=True)
    return ddq.prepare(
        model, DDQConfig(first_last_bits="learn"), example_inputs=torch.zeros(1, 1, 28, 28)
    )
