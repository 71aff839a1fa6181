"""Dense bit packing of b-bit quantization indices (b in 1..8).

Packed format (the exported file format depends on it, so it is fixed):

* The ``n`` indices are taken in flat (row-major, ``Tensor.flatten``) order and written as one
  continuous bit stream with **no per-row or per-element padding**; the stream occupies exactly
  ``ceil(n * b / 8)`` bytes.
* Bit ``s`` of the stream is bit ``s % 8`` of byte ``s // 8``, where bit 0 is the least
  significant bit of a byte (little-endian bit order).
* Element ``i`` occupies stream bits ``i*b .. i*b + b - 1``, least-significant bit of the index
  first. Elements may straddle byte boundaries (e.g. for b = 3, 5, 6, 7).
* The unused high bits of the final byte (``8 * nbytes - n * b`` of them) are zero.

Equivalently: reading the packed bytes as one little-endian unsigned integer ``P``,
``P == sum(idx[i] << (i * b))``. For b = 8 the stream is the indices themselves, one per byte;
for b = 4 element ``2j`` is the low nibble of byte ``j`` and element ``2j + 1`` the high nibble.
It is also what ``numpy.packbits(bits, bitorder="little")`` produces when ``bits`` is the
LSB-first, b-bits-per-element expansion of the indices.

Worked example, b = 3, indices ``[1, 2, 7]``: ``P = 1 | 2 << 3 | 7 << 6 = 0x1D1``, which is the
two bytes ``[0xD1, 0x01]`` (9 bits used, 7 zero padding bits).

Implementation: 8 consecutive b-bit indices fill exactly b bytes, so the stream is processed in
groups of 8 elements. Each group is assembled into one int64 word (at most 7 * 8 = 56 bits for
b <= 7), and the word is split into its b little-endian bytes. All work is column-wise over the
groups (loops only over the 8 element positions / b byte positions), so time and memory are
O(n) with small constants.
"""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "packed_nbytes", "unpack_bits"]

# Group size: 8 elements of b bits always span exactly b whole bytes.
_GROUP = 8


def _check_bits(bits: int) -> None:
    # bool is an int subclass; reject it so that pack_bits(x, True) is not silently 1-bit.
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


def packed_nbytes(numel: int, bits: int) -> int:
    """Number of bytes that ``numel`` indices of ``bits`` bits occupy when packed.

    Args:
        numel: Number of indices (>= 0).
        bits: Bits per index, 1..8.

    Returns:
        ``ceil(numel * bits / 8)``.

    Example:
        >>> packed_nbytes(10, 3)
        4
        >>> packed_nbytes(0, 5)
        0
    """
    _check_bits(bits)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    return (numel * bits + 7) // 8


def pack_bits(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer indices in ``[0, 2**bits)`` into a flat uint8 byte stream.

    See the module docstring for the exact layout: flat element order, continuous little-endian
    bit stream, element ``i`` at stream bits ``[i*bits, (i+1)*bits)`` LSB first, zero padding in
    the last byte, exactly ``ceil(numel * bits / 8)`` bytes.

    Args:
        indices: Integer (or bool) tensor of any shape; it is flattened in row-major order.
        bits: Bits per index, 1..8.

    Returns:
        A 1-D ``torch.uint8`` tensor of length ``ceil(indices.numel() * bits / 8)`` on the same
        device as ``indices``.

    Raises:
        ValueError: if ``bits`` is not in 1..8, ``indices`` is not an integer tensor, or any index
            is outside ``[0, 2**bits)``.

    Example:
        >>> pack_bits(torch.tensor([1, 2, 7]), 3)
        tensor([209,   1], dtype=torch.uint8)
        >>> pack_bits(torch.tensor([[1, 2], [3, 0]]), 4)  # element 0 is the low nibble
        tensor([33,  3], dtype=torch.uint8)
    """
    _check_bits(bits)
    if not isinstance(indices, torch.Tensor):
        raise ValueError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.is_floating_point() or indices.is_complex():
        raise ValueError(f"indices must have an integer dtype, got {indices.dtype}")
    flat = indices.reshape(-1)
    n = flat.numel()
    device = flat.device
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    if flat.dtype != torch.bool:
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= (1 << bits):
            raise ValueError(
                f"indices must lie in [0, {1 << bits}) for bits={bits}, got values in [{lo}, {hi}]"
            )
    # Range is checked, so the casts cannot wrap.
    if bits == 8:
        # copy=True so the result never aliases the caller's tensor.
        return flat.to(torch.uint8, copy=True)
    flat = flat.to(torch.uint8)
    nbytes = (n * bits + 7) // 8

    groups = -(-n // _GROUP)
    pad = groups * _GROUP - n
    if pad:
        # Zero-valued padding elements produce the required zero padding bits.
        flat = torch.cat([flat, flat.new_zeros(pad)])
    cols = flat.view(groups, _GROUP)
    # Assemble one word per group: element j at bit offset j*bits (<= 56 bits, fits in int64).
    word = cols[:, 0].to(torch.int64)
    for j in range(1, _GROUP):
        word |= cols[:, j].to(torch.int64) << (j * bits)
    out = torch.empty((groups, bits), dtype=torch.uint8, device=device)
    for k in range(bits):
        out[:, k] = ((word >> (8 * k)) & 0xFF).to(torch.uint8)
    # The last group may carry whole bytes made only of padding; drop them.
    return out.reshape(-1)[:nbytes]


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: decode ``numel`` indices of ``bits`` bits.

    Args:
        packed: ``torch.uint8`` tensor holding the stream (any shape, read in flat order). It
            must contain at least ``ceil(numel * bits / 8)`` bytes; bytes after those are
            ignored, and so are the padding bits of the last used byte.
        bits: Bits per index, 1..8.
        numel: Number of indices to decode.

    Returns:
        A 1-D ``torch.uint8`` tensor of ``numel`` indices (reshape it to the original shape),
        on the same device as ``packed``.

    Raises:
        ValueError: if ``bits`` is not in 1..8, ``numel`` is negative, ``packed`` is not uint8,
            or ``packed`` is shorter than ``ceil(numel * bits / 8)`` bytes.

    Example:
        >>> unpack_bits(torch.tensor([209, 1], dtype=torch.uint8), 3, 3)
        tensor([1, 2, 7], dtype=torch.uint8)
    """
    nbytes = packed_nbytes(numel, bits)
    if not isinstance(packed, torch.Tensor):
        raise ValueError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must have dtype torch.uint8, got {packed.dtype}")
    flat = packed.reshape(-1)
    if flat.numel() < nbytes:
        raise ValueError(
            f"packed is too short: {numel} indices of {bits} bits need {nbytes} bytes, "
            f"got {flat.numel()}"
        )
    device = flat.device
    if numel == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    flat = flat[:nbytes]
    if bits == 8:
        return flat.clone()

    groups = -(-numel // _GROUP)
    pad = groups * bits - nbytes
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    cols = flat.view(groups, bits)
    # Rebuild each group's little-endian word, then slice the 8 indices back out of it.
    word = cols[:, 0].to(torch.int64)
    for k in range(1, bits):
        word |= cols[:, k].to(torch.int64) << (8 * k)
    mask = (1 << bits) - 1
    out = torch.empty((groups, _GROUP), dtype=torch.uint8, device=device)
    for j in range(_GROUP):
        out[:, j] = ((word >> (j * bits)) & mask).to(torch.uint8)
    return out.reshape(-1)[:numel]
