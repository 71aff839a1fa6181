"""torchvision ``resnet18`` and ``mobilenet_v2``, always randomly initialized (no download).

``small_input=True`` adapts the stem to 28x28 / 32x32 images (MNIST, CIFAR), following the
usual CIFAR variants of these networks, and ``in_channels`` replaces the first conv so
1-channel images need no channel replication.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ddq.models.registry import register_model

__all__ = ["MOBILENET_V2_SETTING", "mobilenet_v2", "resnet18"]

# torchvision's default MobileNetV2 inverted-residual setting: t (expansion), c (channels),
# n (repeats), s (stride of the first block of the group).
MOBILENET_V2_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _torchvision() -> Any:
    try:
        import torchvision
    except ImportError as exc:  # torchvision is an optional extra (ddq[cli])
        raise ImportError(
            "torchvision models need torchvision (pip install 'ddq[cli]' or pip install "
            "torchvision)"
        ) from exc
    return torchvision


def _refuse_pretrained(kw: dict[str, Any]) -> None:
    # torchvision would download weights for these; ddq must never touch the network.
    for key in ("weights", "pretrained"):
        if kw.get(key):
            raise ValueError(
                f"{key}={kw[key]!r} is not supported: ddq never downloads weights; build the "
                "model and call ddq.models.load_weights(model, path) with a local file"
            )
        kw.pop(key, None)


def _new_conv(
    in_channels: int, out_channels: int, kernel: int, stride: int, padding: int
) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=False)
    # Same initialization torchvision applies to every conv of these models.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


@register_model("resnet18")
def resnet18(
    num_classes: int = 10, in_channels: int = 3, small_input: bool = False, **kw: Any
) -> nn.Module:
    """torchvision ResNet-18 with ``weights=None``.

    ``small_input=True``: ``conv1`` becomes 3x3 stride 1 and the max-pool is removed (the
    standard CIFAR ResNet stem), so total downsampling is 8x instead of 32x: a 28x28 input
    reaches the last stage at 4x4, a 32x32 one at 4x4. Otherwise the 7x7 stride-2 stem is
    kept (re-created only when ``in_channels != 3``). Extra ``kw`` go to torchvision's
    ``resnet18`` (e.g. ``zero_init_residual=True``).

    Example:
        >>> import torch
        >>> model = resnet18(num_classes=10, in_channels=1, small_input=True)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    _refuse_pretrained(kw)
    model = _torchvision().models.resnet18(weights=None, num_classes=num_classes, **kw)
    out = model.conv1.out_channels
    if small_input:
        model.conv1 = _new_conv(in_channels, out, kernel=3, stride=1, padding=1)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = _new_conv(in_channels, out, kernel=7, stride=2, padding=3)
    return model


@register_model("mobilenet_v2")
def mobilenet_v2(
    num_classes: int = 10,
    in_channels: int = 3,
    small_input: bool = False,
    width_mult: float = 1.0,
    **kw: Any,
) -> nn.Module:
    """torchvision MobileNetV2 with ``weights=None`` and width multiplier ``width_mult``.

    ``small_input=True``: the stem conv gets stride 1, so total downsampling goes from 32x
    to 16x: 28x28 -> 28 (stem) -> 14 (24 ch) -> 7 (32 ch) -> 4 (64/96 ch) -> 2 (160/320 ch).
    This keeps every inverted-residual stage and the 2x2 map the last stages see is enough
    for MNIST/CIFAR-sized inputs, at 22 MMACs per 28x28 image; the CIFAR variant that also
    removes the second stride (8x downsampling) costs 3.4x more (73 MMACs), which on a
    2-core CPU decides whether a run takes minutes or most of an hour. A custom ``inverted_residual_setting`` in ``kw`` is
    passed through unchanged. Other ``kw`` go to torchvision's ``mobilenet_v2`` (e.g.
    ``dropout``, ``round_nearest``).

    Example:
        >>> import torch
        >>> model = mobilenet_v2(num_classes=10, in_channels=3, small_input=True, width_mult=0.5)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    _refuse_pretrained(kw)
    setting = [list(row) for row in kw.pop("inverted_residual_setting", MOBILENET_V2_SETTING)]
    model = _torchvision().models.mobilenet_v2(
        weights=None,
        num_classes=num_classes,
        width_mult=width_mult,
        inverted_residual_setting=setting,
        **kw,
    )
    stem = model.features[0][0]
    if small_input or in_channels != 3:
        model.features[0][0] = _new_conv(
            in_channels, stem.out_channels, kernel=3, stride=1 if small_input else 2, padding=1
        )
    return model
