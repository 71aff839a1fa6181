"""Tests for ddq.data: registry, embedded mnist5k, on-disk folders and seeded loaders."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddq.data import DatasetSplits, create_dataset, list_datasets, make_loaders
from ddq.data.registry import register_dataset


def _image_keys(x: torch.Tensor) -> set[bytes]:
    return {img.numpy().tobytes() for img in x}


# --------------------------------------------------------------------------- registry


def test_builtin_datasets_are_listed() -> None:
    assert {"mnist5k", "cifar10", "imagefolder"} <= set(list_datasets())
    assert list_datasets() == sorted(list_datasets())


def test_unknown_dataset_lists_available_names() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'nope'") as info:
        create_dataset("nope")
    for name in ("mnist5k", "cifar10", "imagefolder"):
        assert name in str(info.value)


def test_register_dataset_refuses_silent_shadowing() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @register_dataset("mnist5k")
        def _other(root=None, subset=None, seed=0):  # pragma: no cover - never called
            raise AssertionError


@pytest.mark.parametrize("bad", [0, -3, True])
def test_bad_subset_is_rejected(bad: int) -> None:
    with pytest.raises(ValueError, match="subset"):
        create_dataset("mnist5k", subset=bad)


# --------------------------------------------------------------------------- mnist5k


@pytest.fixture(scope="module")
def mnist() -> DatasetSplits:
    return create_dataset()  # the default dataset is mnist5k


def test_mnist_default_shapes_and_metadata(mnist: DatasetSplits) -> None:
    assert mnist.name == "mnist5k"
    assert (len(mnist.train), len(mnist.test)) == (4000, 1000)
    assert (mnist.num_classes, mnist.in_channels, mnist.image_size) == (10, 1, 28)
    x, y = mnist.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert len(mnist.mean) == len(mnist.std) == 1
    assert 0.0 < mnist.mean[0] < 1.0 and 0.0 < mnist.std[0] < 1.0


def test_mnist_is_standardized_with_train_statistics(mnist: DatasetSplits) -> None:
    x_train = mnist.train.tensors[0]
    assert abs(x_train.mean().item()) < 1e-4
    assert abs(x_train.std().item() - 1.0) < 1e-3
    # Undoing the normalization must give back [0, 1] pixel values on multiples of 1/255.
    raw = x_train * mnist.std[0] + mnist.mean[0]
    assert raw.min().item() > -1e-4 and raw.max().item() < 1 + 1e-4
    assert torch.allclose(raw * 255, (raw * 255).round(), atol=1e-3)


def test_mnist_is_deterministic(mnist: DatasetSplits) -> None:
    again = create_dataset("mnist5k")
    for a, b in ((mnist.train, again.train), (mnist.test, again.test)):
        assert torch.equal(a.tensors[0], b.tensors[0])
        assert torch.equal(a.tensors[1], b.tensors[1])
    assert again.mean == mnist.mean and again.std == mnist.std


def test_mnist_split_is_stratified_and_disjoint(mnist: DatasetSplits) -> None:
    assert np.bincount(mnist.train.tensors[1].numpy()).tolist() == [400] * 10
    assert np.bincount(mnist.test.tensors[1].numpy()).tolist() == [100] * 10
    assert not _image_keys(mnist.train.tensors[0]) & _image_keys(mnist.test.tensors[0])


def test_mnist_split_is_pinned() -> None:
    """The default split is part of the results' provenance: it must never drift between
    machines or library versions. These digests fix the exact example indices."""
    from ddq.data.mnist import _raw_mnist, _split_indices

    images, labels = _raw_mnist()
    train_idx, test_idx = _split_indices(labels, 0)

    def digest(a: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()

    assert digest(images) == "2913c6b6527114b7307e1086335a7665e3f94c74aba3d67525e6f116bf5ae20f"
    assert digest(train_idx.astype("<i8")) == (
        "40428e36b7f5da5888db79fe04adf21567984f2585cf1ff130d28a946152536c"
    )
    assert digest(test_idx.astype("<i8")) == (
        "fde0acebbc7a680f44e0af582d282a45dd05fc5a3db70c993ccdfb794d2c5226"
    )


def test_mnist_seed_changes_split_but_not_sizes(mnist: DatasetSplits) -> None:
    other = create_dataset("mnist5k", seed=1)
    assert (len(other.train), len(other.test)) == (4000, 1000)
    assert not torch.equal(other.test.tensors[0], mnist.test.tensors[0])


def test_mnist_subset_is_a_deterministic_prefix(mnist: DatasetSplits) -> None:
    small = create_dataset("mnist5k", subset=100)
    assert (len(small.train), len(small.test)) == (100, 100)
    assert torch.equal(small.train.tensors[0], mnist.train.tensors[0][:100])
    assert torch.equal(small.test.tensors[1], mnist.test.tensors[1][:100])
    # Normalization uses the full train split, so a subset sees the same input scale.
    assert small.mean == mnist.mean
    # The prefix is class-mixed, not 100 zeros.
    assert len(torch.unique(small.train.tensors[1])) == 10
    assert len(torch.unique(small.test.tensors[1])) == 10

    big = create_dataset("mnist5k", subset=2000)
    assert (len(big.train), len(big.test)) == (2000, 1000)


def test_mnist_returns_independent_tensors() -> None:
    a = create_dataset("mnist5k", subset=10)
    a.train.tensors[0].zero_()  # a caller mutating its copy must not poison later calls
    b = create_dataset("mnist5k", subset=10)
    assert b.train.tensors[0].abs().sum() > 0


# --------------------------------------------------------------------------- cifar10


def test_cifar_without_root_explains_how_to_provide_it() -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py") as info:
        create_dataset("cifar10")
    assert "never downloads" in str(info.value)


def test_cifar_missing_folder_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        create_dataset("cifar10", root=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert "cifar-10-python.tar.gz" in msg and "never downloads" in msg


def test_cifar_incomplete_folder_names_missing_files(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="incomplete") as info:
        create_dataset("cifar10", root=tmp_path)
    assert str(folder / "test_batch") in str(info.value)
    assert str(folder / "data_batch_1") not in str(info.value)


def test_cifar_corrupt_files_give_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        (folder / name).write_bytes(b"not cifar")
    with pytest.raises(ValueError, match="integrity check") as info:
        create_dataset("cifar10", root=folder)  # pointing at the batches folder also works
    assert str(folder) in str(info.value) and "re-extract" in str(info.value)


# --------------------------------------------------------------------------- imagefolder


def _make_image_folder(root: Path, per_class: dict[str, int], split: str) -> None:
    rng = np.random.default_rng(0)
    for cls, count in per_class.items():
        folder = root / split / cls
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(20 + i, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.fixture()
def image_root(tmp_path: Path) -> Path:
    _make_image_folder(tmp_path, {"cat": 4, "dog": 3}, "train")
    _make_image_folder(tmp_path, {"cat": 2, "dog": 2}, "val")
    return tmp_path


def test_imagefolder_loads_tiny_pngs(image_root: Path) -> None:
    splits = create_dataset("imagefolder", root=image_root)
    assert (len(splits.train), len(splits.test)) == (7, 4)
    assert splits.num_classes == 2 and splits.classes == ("cat", "dog")
    assert (splits.in_channels, splits.image_size) == (3, 224)
    x, y = splits.test[3]
    assert x.shape == (3, 224, 224) and y == 1
    train_loader, _ = make_loaders(splits, batch_size=4)
    xb, yb = next(iter(train_loader))
    assert xb.shape == (4, 3, 224, 224) and yb.shape == (4,)


def test_imagefolder_image_size_and_subset(image_root: Path) -> None:
    splits = create_dataset("imagefolder", root=image_root, subset=3, image_size=32)
    assert (len(splits.train), len(splits.test)) == (3, 3)
    assert splits.train[0][0].shape == (3, 32, 32)
    again = create_dataset("imagefolder", root=image_root, subset=3, image_size=32)
    assert list(splits.train.indices) == list(again.train.indices)


@pytest.mark.parametrize("missing", ["root", "train", "val"])
def test_imagefolder_missing_folder_is_named(tmp_path: Path, missing: str) -> None:
    root = tmp_path / "data"
    if missing != "root":
        present = "val" if missing == "train" else "train"
        _make_image_folder(root, {"a": 1}, present)
    expected = root if missing == "root" else root / missing
    with pytest.raises(FileNotFoundError) as info:
        create_dataset("imagefolder", root=root)
    assert f"{expected} does not exist" in str(info.value)


def test_imagefolder_without_root() -> None:
    with pytest.raises(FileNotFoundError, match="root"):
        create_dataset("imagefolder")


def test_imagefolder_class_mismatch_is_refused(tmp_path: Path) -> None:
    _make_image_folder(tmp_path, {"a": 1, "b": 1}, "train")
    _make_image_folder(tmp_path, {"a": 1, "c": 1}, "val")
    with pytest.raises(ValueError, match="class folders differ"):
        create_dataset("imagefolder", root=tmp_path)


# --------------------------------------------------------------------------- loaders


def _epoch_labels(loader: torch.utils.data.DataLoader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


def test_loaders_shuffle_reproducibly() -> None:
    splits = create_dataset("mnist5k", subset=200)
    train_a, test_a = make_loaders(splits, batch_size=32, seed=0)
    train_b, _ = make_loaders(splits, batch_size=32, seed=0)
    train_c, _ = make_loaders(splits, batch_size=32, seed=1)
    epoch1, epoch2 = _epoch_labels(train_a), _epoch_labels(train_a)
    assert epoch1 == _epoch_labels(train_b)  # same seed, same order
    assert epoch2 == _epoch_labels(train_b)  # ... every epoch
    assert epoch1 != epoch2  # but epochs differ from each other
    assert epoch1 != _epoch_labels(train_c)
    assert sorted(epoch1) == sorted(splits.train.tensors[1].tolist())
    # The test loader is not shuffled.
    assert _epoch_labels(test_a) == splits.test.tensors[1].tolist()


def test_loaders_with_a_worker_process() -> None:
    splits = create_dataset("mnist5k", subset=64)
    train_a, _ = make_loaders(splits, batch_size=16, workers=1, seed=3)
    train_b, _ = make_loaders(splits, batch_size=16, workers=0, seed=3)
    assert _epoch_labels(train_a) == _epoch_labels(train_b)


def test_loaders_validate_arguments() -> None:
    splits = create_dataset("mnist5k", subset=8)
    with pytest.raises(ValueError, match="batch_size"):
        make_loaders(splits, batch_size=0)
    with pytest.raises(ValueError, match="workers"):
        make_loaders(splits, batch_size=4, workers=-1)


def test_distributed_loaders_need_a_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # pragma: no cover - foreign state
        pytest.skip("a process group is already initialized in this process")
    splits = create_dataset("mnist5k", subset=8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        make_loaders(splits, batch_size=4, distributed=True)


def test_distributed_loaders_single_process_group() -> None:
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    if not dist.is_available() or dist.is_initialized():  # pragma: no cover
        pytest.skip("torch.distributed unavailable or already initialized")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        splits = create_dataset("mnist5k", subset=50)
        train, test = make_loaders(splits, batch_size=8, seed=0, distributed=True)
        assert isinstance(train.sampler, DistributedSampler)
        train.sampler.set_epoch(0)
        labels = _epoch_labels(train)
        assert sorted(labels) == sorted(splits.train.tensors[1].tolist())
        assert _epoch_labels(test) == splits.test.tensors[1].tolist()  # every example once
    finally:
        dist.destroy_process_group()
