"""Dataset registry (timm-like) and reproducible data loaders.

A dataset builder is a function ``builder(root, subset, seed, **kwargs) -> DatasetSplits``
registered under a short name with :func:`register_dataset`. :func:`create_dataset` looks the
name up and calls the builder; :func:`make_loaders` turns the splits into seeded loaders.

Nothing in ``ddq.data`` ever downloads: datasets are either embedded in an installed package
(``mnist5k``) or read from a folder the user provides (``cifar10``, ``imagefolder``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "DatasetSplits",
    "create_dataset",
    "list_datasets",
    "make_loaders",
    "register_dataset",
]

DatasetBuilder = Callable[..., "DatasetSplits"]

_DATASETS: dict[str, DatasetBuilder] = {}

# Modules whose import registers the built-in datasets. Imported lazily by create_dataset /
# list_datasets so that importing ``ddq.data.registry`` alone still sees every built-in name.
_BUILTIN_MODULES = ("ddq.data.mnist", "ddq.data.folders")


@dataclass(frozen=True)
class DatasetSplits:
    """A train/test pair plus the metadata a model and a report need.

    Attributes:
        name: registry name of the dataset (e.g. ``"mnist5k"``).
        train: training split (a ``torch.utils.data.Dataset`` yielding ``(image, label)``).
        test: held-out split used for evaluation.
        num_classes: number of target classes.
        in_channels: channels of one image tensor (1 for MNIST, 3 for RGB).
        image_size: side of the square image tensor the model sees, in pixels.
        mean: per-channel mean used for normalization (in [0, 1] pixel units).
        std: per-channel std used for normalization (in [0, 1] pixel units).
        classes: optional human-readable class names, index-aligned with the labels.

    Example:
        >>> splits = create_dataset("mnist5k", subset=100)
        >>> (len(splits.train), splits.num_classes, splits.image_size)
        (100, 10, 28)
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] | None = None


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Register a dataset builder under ``name`` (decorator).

    The builder is called as ``builder(root=..., subset=..., seed=..., **kwargs)`` and must
    return a :class:`DatasetSplits`.

    Example:
        >>> @register_dataset("my_toy")
        ... def _toy(root=None, subset=None, seed=0):
        ...     ...
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")

    def decorator(fn: DatasetBuilder) -> DatasetBuilder:
        existing = _DATASETS.get(name)
        # Re-registering the same function (module reloaded) is harmless; two different
        # builders under one name would silently shadow each other, so refuse that.
        if existing is not None and (existing.__module__, existing.__qualname__) != (
            fn.__module__,
            fn.__qualname__,
        ):
            raise ValueError(f"dataset {name!r} is already registered by {existing.__module__}")
        _DATASETS[name] = fn
        return fn

    return decorator


def _ensure_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def list_datasets() -> list[str]:
    """Return the sorted names of all registered datasets.

    Example:
        >>> "mnist5k" in list_datasets()
        True
    """
    _ensure_builtins()
    return sorted(_DATASETS)


def create_dataset(
    name: str = "mnist5k",
    root: str | Path | None = None,
    subset: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> DatasetSplits:
    """Build the train/test splits of a registered dataset.

    Args:
        name: registry name; see :func:`list_datasets`. Defaults to the embedded ``mnist5k``.
        root: data folder for datasets read from disk (``cifar10``, ``imagefolder``);
            ignored by embedded datasets.
        subset: if given, keep only ``subset`` training examples and ``min(subset, len(test))``
            test examples (deterministically), for quick experiments and tests.
        seed: seed of any dataset-level randomness (e.g. the mnist5k train/test split).
        **kwargs: builder-specific options (e.g. ``image_size`` for ``imagefolder``).

    Raises:
        ValueError: unknown ``name`` (the message lists the available names) or bad ``subset``.
        FileNotFoundError: the data folder of an on-disk dataset is missing or incomplete.

    Example:
        >>> splits = create_dataset("mnist5k", subset=64)
        >>> x, y = splits.train[0]
        >>> tuple(x.shape)
        (1, 28, 28)
    """
    _ensure_builtins()
    if name not in _DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; available datasets: {', '.join(sorted(_DATASETS))}"
        )
    if subset is not None and (isinstance(subset, bool) or int(subset) < 1):
        raise ValueError(f"subset must be a positive integer or None, got {subset!r}")
    return _DATASETS[name](
        root=root, subset=None if subset is None else int(subset), seed=int(seed), **kwargs
    )


class _ShardSampler(Sampler[int]):
    """Deterministic, non-padding shard ``rank::world_size`` of a dataset, for evaluation.

    ``DistributedSampler`` pads the last shard by repeating examples so every rank gets the
    same count; that double-counts a few test examples in a summed accuracy. Evaluation does
    not need equal shard sizes, so this sampler gives each example to exactly one rank.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length = length
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def make_loaders(
    splits: DatasetSplits,
    batch_size: int,
    workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Create ``(train_loader, test_loader)`` with reproducible shuffling.

    The train loader shuffles with its own ``torch.Generator`` seeded by ``seed``, so the batch
    order of every epoch is identical across runs (it does not depend on the global RNG).
    Worker processes are seeded from that generator as well. Random *augmentations* running
    in the main process (``workers=0``) still draw from the global torch RNG: call
    ``torch.manual_seed`` before training for fully reproducible augmentation.

    With ``distributed=True`` (requires an initialized ``torch.distributed`` process group),
    the train loader uses a ``DistributedSampler`` seeded by ``seed``; call
    ``train_loader.sampler.set_epoch(epoch)`` each epoch to reshuffle. The test loader gives
    each rank a disjoint, unpadded shard (every test example is evaluated exactly once
    across ranks, so per-rank correct/total counts can simply be all-reduced).

    Example:
        >>> splits = create_dataset("mnist5k", subset=256)
        >>> train_loader, test_loader = make_loaders(splits, batch_size=64, seed=0)
        >>> x, y = next(iter(train_loader))
        >>> tuple(x.shape)
        (64, 1, 28, 28)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")

    generator = torch.Generator()
    generator.manual_seed(seed)
    common: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": workers,
        # Keeping workers alive avoids re-forking (and re-importing torch) every epoch.
        "persistent_workers": workers > 0,
    }

    if distributed:
        import torch.distributed as dist
        from torch.utils.data.distributed import DistributedSampler

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "make_loaders(distributed=True) needs an initialized torch.distributed process "
                "group (call torch.distributed.init_process_group first, e.g. under torchrun)"
            )
        rank, world = dist.get_rank(), dist.get_world_size()
        train_sampler: Sampler[int] = DistributedSampler(
            splits.train, num_replicas=world, rank=rank, shuffle=True, seed=seed
        )
        n_test = len(splits.test)  # type: ignore[arg-type]
        test_sampler: Sampler[int] = _ShardSampler(n_test, rank, world)
        train_loader = DataLoader(
            splits.train, sampler=train_sampler, generator=generator, **common
        )
        test_loader = DataLoader(splits.test, sampler=test_sampler, **common)
    else:
        train_loader = DataLoader(splits.train, shuffle=True, generator=generator, **common)
        test_loader = DataLoader(splits.test, shuffle=False, **common)
    return train_loader, test_loader
