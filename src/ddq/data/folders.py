"""On-disk datasets: ``cifar10`` (the python pickle batches) and ``imagefolder``.

Both read a folder the user provides and never download anything: a missing or incomplete
folder raises :class:`FileNotFoundError` naming the exact path that is missing and how to
provide it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from ddq.data.registry import DatasetSplits, register_dataset

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_cifar10",
    "load_imagefolder",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = (
    "batches.meta",
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
)


def _torchvision() -> Any:
    try:
        import torchvision
    except ImportError as exc:  # torchvision is an optional extra (ddq[cli])
        raise ImportError(
            "on-disk datasets need torchvision (pip install 'ddq[cli]' or pip install torchvision)"
        ) from exc
    return torchvision


def _prefix(ds: Dataset, n: int | None) -> Dataset:
    if n is None or n >= len(ds):  # type: ignore[arg-type]
        return ds
    return Subset(ds, range(n))


def load_cifar10(root: str | Path | None, subset: int | None = None) -> DatasetSplits:
    """Load CIFAR-10 from ``ROOT/cifar-10-batches-py`` (the official python version).

    Train images get the standard 4-pixel-padded random 32x32 crop and horizontal flip;
    both splits are normalized with the usual CIFAR-10 channel mean/std. ``root`` may also
    point at the ``cifar-10-batches-py`` folder itself. ``subset=n`` keeps the first ``n``
    examples of each split (the official batches are already in random class order).

    Raises:
        FileNotFoundError: ``root`` is None, or a required batch file is missing.
        ValueError: the files exist but fail torchvision's checksum (corrupt download).

    Example:
        >>> splits = load_cifar10("/data/cifar")  # needs /data/cifar/cifar-10-batches-py
        >>> splits.num_classes, splits.image_size
        (10, 32)
    """
    how = (
        "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and "
        "extract it under ROOT so that ROOT/cifar-10-batches-py exists; ddq never downloads"
    )
    if root is None:
        raise FileNotFoundError(f"cifar10 needs a data folder: pass root=ROOT (--data-root). {how}")
    base = Path(root).expanduser()
    # Accept ROOT/cifar-10-batches-py itself: a common way to point at the data.
    if base.name == _CIFAR_DIR and not (base / _CIFAR_DIR).exists():
        base = base.parent
    folder = base / _CIFAR_DIR
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-10 not found: {folder} does not exist. {how}")
    missing = [str(folder / f) for f in _CIFAR_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 is incomplete, missing: {', '.join(missing)}. {how}")

    tv = _torchvision()
    t = tv.transforms
    normalize = t.Normalize(CIFAR10_MEAN, CIFAR10_STD)
    train_tf = t.Compose(
        [t.RandomCrop(32, padding=4), t.RandomHorizontalFlip(), t.ToTensor(), normalize]
    )
    test_tf = t.Compose([t.ToTensor(), normalize])
    try:
        train = tv.datasets.CIFAR10(str(base), train=True, transform=train_tf, download=False)
        test = tv.datasets.CIFAR10(str(base), train=False, transform=test_tf, download=False)
    except RuntimeError as exc:
        # torchvision's message suggests download=True, which ddq deliberately never does.
        raise ValueError(
            f"CIFAR-10 files under {folder} failed torchvision's integrity check ({exc}); "
            f"re-extract them. {how}"
        ) from exc
    return DatasetSplits(
        name="cifar10",
        train=_prefix(train, subset),
        test=_prefix(test, subset),
        num_classes=10,
        in_channels=3,
        image_size=32,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        classes=tuple(train.classes),
    )


def load_imagefolder(
    root: str | Path | None,
    subset: int | None = None,
    seed: int = 0,
    image_size: int = 224,
) -> DatasetSplits:
    """Load an ImageNet-style folder: ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*``.

    Train images get ``RandomResizedCrop(image_size)`` + horizontal flip; validation images
    are resized to ``image_size * 256 / 224`` and center-cropped (the standard ImageNet
    protocol); both use the ImageNet mean/std. Class indices follow the sorted folder names,
    so ``train`` and ``val`` must contain the same class folders. Because the folders are
    sorted by class, ``subset=n`` keeps a seeded random sample of ``n`` examples per split
    (not the first ``n``, which would all be one class).

    Raises:
        FileNotFoundError: ``root``, ``ROOT/train`` or ``ROOT/val`` is missing, or a split
            holds no class folder with images.
        ValueError: ``train`` and ``val`` have different class folders.

    Example:
        >>> splits = load_imagefolder("/data/imagenet", subset=1000)
        >>> splits.image_size, splits.in_channels
        (224, 3)
    """
    how = (
        "expected ROOT/train/<class>/<image> and ROOT/val/<class>/<image> "
        "(the torchvision ImageFolder layout); ddq never downloads"
    )
    if root is None:
        raise FileNotFoundError(
            f"imagefolder needs a data folder: pass root=ROOT (--data-root); {how}"
        )
    base = Path(root).expanduser()
    for path in (base, base / "train", base / "val"):
        if not path.is_dir():
            raise FileNotFoundError(f"image folder dataset: {path} does not exist; {how}")

    tv = _torchvision()
    t = tv.transforms
    normalize = t.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = t.Compose(
        [t.RandomResizedCrop(image_size), t.RandomHorizontalFlip(), t.ToTensor(), normalize]
    )
    test_tf = t.Compose(
        [
            t.Resize(round(image_size * 256 / 224)),
            t.CenterCrop(image_size),
            t.ToTensor(),
            normalize,
        ]
    )
    train = tv.datasets.ImageFolder(str(base / "train"), transform=train_tf)
    test = tv.datasets.ImageFolder(str(base / "val"), transform=test_tf)
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_val = sorted(set(test.classes) - set(train.classes))
        raise ValueError(
            f"class folders differ between {base / 'train'} and {base / 'val'} "
            f"(only in train: {only_train[:5]}, only in val: {only_val[:5]}); labels would not "
            "line up"
        )

    def _sample(ds: Dataset, n: int | None, salt: int) -> Dataset:
        size = len(ds)  # type: ignore[arg-type]
        if n is None or n >= size:
            return ds

        # A keyed hash, not an RNG stream, so the sample is identical on every machine and
        # library version; ``salt`` gives train and val independent samples.
        def key(i: int) -> bytes:
            msg = f"{salt}:{i}".encode()
            return hashlib.blake2b(msg, digest_size=8, key=str(seed).encode()).digest()

        return Subset(ds, sorted(sorted(range(size), key=key)[:n]))

    return DatasetSplits(
        name="imagefolder",
        train=_sample(train, subset, 0),
        test=_sample(test, subset, 1),
        num_classes=len(train.classes),
        in_channels=3,
        image_size=image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        classes=tuple(train.classes),
    )


@register_dataset("cifar10")
def _build_cifar10(
    root: str | Path | None = None, subset: int | None = None, seed: int = 0
) -> DatasetSplits:
    del seed  # the official split is fixed; shuffling is the loader's job
    return load_cifar10(root, subset=subset)


@register_dataset("imagefolder")
def _build_imagefolder(
    root: str | Path | None = None,
    subset: int | None = None,
    seed: int = 0,
    image_size: int = 224,
) -> DatasetSplits:
    return load_imagefolder(root, subset=subset, seed=seed, image_size=image_size)
