"""Byte-level text from the Python standard library's own source files.

A language-modelling corpus that every machine running ``ddq`` already has: a fixed list
of ``.py`` modules from the directory of the running interpreter's standard library
(``Path(os.__file__).parent``), read as bytes, so the vocabulary is the 256 byte values
and no tokenizer is needed. Nothing is downloaded.

The files differ between Python versions, so :class:`StdlibText` records the version and
a SHA-256 of the text it was built from (``describe()``): a result says what it trained on.

The split is by file: :data:`TRAIN_FILES` for training, :data:`VAL_FILES` (whole modules
never seen in training) for validation.

Example:
    >>> from ddq.data.stdlib_text import load_stdlib_text, random_windows
    >>> text = load_stdlib_text()
    >>> text.vocab_size, text.train.dtype
    (256, torch.uint8)
    >>> x, y = random_windows(text.train, seq_len=64, batch_size=8,
    ...                       generator=torch.Generator().manual_seed(0))
    >>> tuple(x.shape), bool((x[:, 1:] == y[:, :-1]).all())
    ((8, 64), True)
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TRAIN_FILES",
    "VAL_FILES",
    "StdlibText",
    "load_stdlib_text",
    "random_windows",
    "sequential_windows",
    "stdlib_dir",
]

#: Training modules (about 0.55 MB on Python 3.11): chosen to exist, unchanged in name,
#: in every CPython 3.11 to 3.13 (no module scheduled for removal by PEP 594).
TRAIN_FILES: tuple[str, ...] = (
    "argparse.py",
    "base64.py",
    "bisect.py",
    "calendar.py",
    "colorsys.py",
    "contextlib.py",
    "copy.py",
    "csv.py",
    "dataclasses.py",
    "fnmatch.py",
    "fractions.py",
    "functools.py",
    "glob.py",
    "heapq.py",
    "queue.py",
    "random.py",
    "shlex.py",
    "string.py",
    "textwrap.py",
    "threading.py",
)

#: Validation modules (about 0.1 MB on Python 3.11), disjoint from :data:`TRAIN_FILES`.
VAL_FILES: tuple[str, ...] = (
    "getopt.py",
    "pprint.py",
    "statistics.py",
    "weakref.py",
)

# Between concatenated files: a separator that is itself valid (and rare) Python text.
_SEPARATOR = b"\n\n"


def stdlib_dir() -> Path:
    """The directory of the running interpreter's pure-Python standard library.

    Example:
        >>> (stdlib_dir() / "os.py").is_file()
        True
    """
    return Path(os.__file__).resolve().parent


@dataclass(frozen=True)
class StdlibText:
    """Train and validation byte tokens plus what they were built from.

    Attributes:
        train: ``uint8`` tokens of the training files, concatenated.
        val: ``uint8`` tokens of the validation files, concatenated.
        train_files: the training module file names, in order.
        val_files: the validation module file names, in order.
        python_version: the interpreter whose standard library was read (``"3.11.7"``).
        sha256: SHA-256 of the training text, a separator byte, then the validation text.
        vocab_size: 256 (byte values).
    """

    train: torch.Tensor
    val: torch.Tensor
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    python_version: str
    sha256: str
    vocab_size: int = 256

    def describe(self) -> dict[str, Any]:
        """Plain data for a results file: version, hash, files and sizes (no tokens).

        Example:
            >>> sorted(load_stdlib_text().describe())[:3]
            ['python_implementation', 'python_version', 'sha256']
        """
        return {
            "python_version": self.python_version,
            "python_implementation": platform.python_implementation(),
            "sha256": self.sha256,
            "train_files": list(self.train_files),
            "val_files": list(self.val_files),
            "train_bytes": int(self.train.numel()),
            "val_bytes": int(self.val.numel()),
            "vocab_size": self.vocab_size,
        }


def _read(directory: Path, names: Sequence[str], role: str) -> bytes:
    parts = []
    for name in names:
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(
                f"stdlib text: {role} file {name!r} is not in {directory} (Python "
                f"{platform.python_version()}); this Python's standard library lacks it or "
                "ships it elsewhere: pass train_files=/val_files= naming modules it has"
            )
        parts.append(path.read_bytes())
    return _SEPARATOR.join(parts)


def load_stdlib_text(
    train_files: Sequence[str] = TRAIN_FILES,
    val_files: Sequence[str] = VAL_FILES,
    directory: str | Path | None = None,
) -> StdlibText:
    """Read the standard-library modules as byte tokens (vocabulary 256).

    Args:
        train_files: module file names for training (default :data:`TRAIN_FILES`).
        val_files: module file names for validation (default :data:`VAL_FILES`); must not
            overlap ``train_files``.
        directory: where to read them; default :func:`stdlib_dir`.

    Raises:
        FileNotFoundError: a named file is missing (the message names it, the directory
            and the Python version).
        ValueError: empty or overlapping file lists.

    Example:
        >>> text = load_stdlib_text(["bisect.py"], ["heapq.py"])
        >>> text.train_files, len(text.sha256)
        (('bisect.py',), 64)
    """
    train_files, val_files = tuple(train_files), tuple(val_files)
    if not train_files or not val_files:
        raise ValueError("stdlib text needs at least one training and one validation file")
    overlap = sorted(set(train_files) & set(val_files))
    if overlap:
        raise ValueError(f"stdlib text: files in both splits: {overlap}")
    root = Path(directory) if directory is not None else stdlib_dir()
    train = _read(root, train_files, "training")
    val = _read(root, val_files, "validation")
    digest = hashlib.sha256(train + b"\0" + val).hexdigest()

    def tokens(data: bytes) -> torch.Tensor:
        # bytearray: torch.frombuffer wants a writable buffer; clone owns the memory.
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()

    return StdlibText(
        train=tokens(train),
        val=tokens(val),
        train_files=train_files,
        val_files=val_files,
        python_version=platform.python_version(),
        sha256=digest,
    )


def random_windows(
    tokens: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of random windows: inputs ``(B, T)`` and next-byte targets ``(B, T)``.

    Both are ``int64``; ``targets[:, t] == inputs[:, t + 1]`` within a window.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = random_windows(torch.arange(100, dtype=torch.uint8), 8, 2, g)
        >>> bool((y - x == 1).all())
        True
    """
    if tokens.numel() < seq_len + 1:
        raise ValueError(f"{tokens.numel()} tokens are too few for windows of {seq_len} + 1")
    starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    chunk = tokens[starts[:, None] + offsets].long()
    return chunk[:, :-1], chunk[:, 1:]


def sequential_windows(
    tokens: torch.Tensor, seq_len: int, batch_size: int, limit: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows covering ``tokens`` in order, in batches (for evaluation).

    Every token but the first is predicted exactly once, from up to ``seq_len`` bytes of
    context within its window; a trailing remainder shorter than a window is dropped.
    ``limit``: at most that many windows.

    Example:
        >>> batches = list(sequential_windows(torch.arange(21, dtype=torch.uint8), 4, 2))
        >>> [tuple(x.shape) for x, _ in batches]
        [(2, 4), (2, 4), (1, 4)]
    """
    n = (tokens.numel() - 1) // seq_len
    if limit is not None:
        n = min(n, limit)
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        chunk = tokens[idx[:, None] * seq_len + torch.arange(seq_len + 1)].long()
        yield chunk[:, :-1], chunk[:, 1:]
