"""Datasets for ddq: a timm-like registry plus reproducible loaders.

Built-in datasets: ``mnist5k`` (embedded, the default), ``cifar10`` and ``imagefolder``
(read from a local folder; ddq never downloads). For language models,
``load_stdlib_text`` reads byte tokens from the running Python's own standard-library
source files (``ddq.data.stdlib_text``; not in the image-dataset registry).

Example:
    >>> from ddq.data import create_dataset, make_loaders
    >>> splits = create_dataset("mnist5k", subset=256)
    >>> train_loader, test_loader = make_loaders(splits, batch_size=64)
"""

from ddq.data import folders as folders
from ddq.data import mnist as mnist
from ddq.data.folders import load_cifar10, load_imagefolder
from ddq.data.mnist import load_mnist5k
from ddq.data.registry import (
    DatasetSplits,
    create_dataset,
    list_datasets,
    make_loaders,
    register_dataset,
)
from ddq.data.stdlib_text import load_stdlib_text

__all__ = [
    "DatasetSplits",
    "create_dataset",
    "list_datasets",
    "load_cifar10",
    "load_imagefolder",
    "load_mnist5k",
    "load_stdlib_text",
    "make_loaders",
    "register_dataset",
]
