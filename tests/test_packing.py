"""Tests for ddq.deploy.packing: exact layout, round trips and validation."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddq.deploy import packing
from ddq.deploy.packing import pack_bits, packed_nbytes, unpack_bits

BITS = list(range(1, 9))


def reference_pack(values: list[int], bits: int) -> bytes:
    """The documented layout, literally: P = sum(idx[i] << (i * bits)), little-endian bytes."""
    p = 0
    for i, v in enumerate(values):
        p |= v << (i * bits)
    return p.to_bytes((len(values) * bits + 7) // 8, "little")


@st.composite
def bits_and_values(draw: st.DrawFn, max_len: int = 100) -> tuple[int, list[int]]:
    bits = draw(st.sampled_from(BITS))
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=max_len))
    return bits, values


@settings(max_examples=300, deadline=None)
@given(bits_and_values())
def test_pack_matches_reference_layout_and_round_trips(case: tuple[int, list[int]]) -> None:
    bits, values = case
    idx = torch.tensor(values, dtype=torch.int64)
    packed = pack_bits(idx, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == -(-len(values) * bits // 8) == packed_nbytes(len(values), bits)
    assert bytes(packed.tolist()) == reference_pack(values, bits)
    out = unpack_bits(packed, bits, len(values))
    assert out.dtype == torch.uint8
    assert out.tolist() == values


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1001])
def test_every_bits_and_awkward_lengths(bits: int, n: int) -> None:
    gen = torch.Generator().manual_seed(1000 * bits + n)
    idx = torch.randint(0, 1 << bits, (n,), generator=gen)
    packed = pack_bits(idx, bits)
    assert packed.numel() == (n * bits + 7) // 8
    assert bytes(packed.tolist()) == reference_pack(idx.tolist(), bits)
    assert torch.equal(unpack_bits(packed, bits, n), idx.to(torch.uint8))


@pytest.mark.parametrize("bits", BITS)
def test_matches_numpy_packbits_little(bits: int) -> None:
    # Documented equivalence: packbits(LSB-first bit expansion, bitorder="little").
    gen = torch.Generator().manual_seed(bits)
    idx = torch.randint(0, 1 << bits, (333,), generator=gen)
    expanded = (idx.numpy()[:, None] >> np.arange(bits)) & 1
    expected = np.packbits(expanded.reshape(-1).astype(np.uint8), bitorder="little")
    assert np.array_equal(pack_bits(idx, bits).numpy(), expected)


def test_documented_examples() -> None:
    assert pack_bits(torch.tensor([1, 2, 7]), 3).tolist() == [0xD1, 0x01]
    # 4 bits: element 2j is the low nibble of byte j.
    assert pack_bits(torch.tensor([0x1, 0x2, 0x3]), 4).tolist() == [0x21, 0x03]
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b1101, 1]
    failures, _ = doctest.testmod(packing, verbose=False)
    assert failures == 0


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool]
)
def test_integer_dtypes_and_shapes(dtype: torch.dtype) -> None:
    bits = 1 if dtype == torch.bool else 5
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 1 << bits, (3, 4, 5), generator=gen).to(dtype)
    packed = pack_bits(idx, bits)
    assert packed.numel() == (60 * bits + 7) // 8
    # Multi-dimensional input is packed in flat row-major order.
    assert torch.equal(packed, pack_bits(idx.reshape(-1).to(torch.int64), bits))
    out = unpack_bits(packed, bits, idx.numel()).reshape(idx.shape)
    assert torch.equal(out, idx.to(torch.uint8))


def test_non_contiguous_input() -> None:
    idx = torch.arange(64).reshape(8, 8) % 8
    assert torch.equal(pack_bits(idx.t(), 3), pack_bits(idx.t().contiguous(), 3))


def test_bits8_is_identity_copy() -> None:
    idx = torch.arange(256, dtype=torch.uint8)
    packed = pack_bits(idx, 8)
    assert torch.equal(packed, idx)
    packed[0] = 99  # must not write through to the caller's tensor
    assert idx[0] == 0


@settings(max_examples=100, deadline=None)
@given(bits_and_values(max_len=40), st.integers(0, 255), st.integers(0, 3))
def test_unpack_ignores_padding_bits_and_trailing_bytes(
    case: tuple[int, list[int]], junk: int, extra: int
) -> None:
    bits, values = case
    packed = pack_bits(torch.tensor(values, dtype=torch.int64), bits)
    used = len(values) * bits
    if packed.numel():
        # Fill the unused high bits of the last byte with junk.
        pad_bits = 8 * packed.numel() - used
        keep = (1 << (8 - pad_bits)) - 1
        packed[-1] = (int(packed[-1]) & keep) | (junk & ~keep & 0xFF)
    packed = torch.cat([packed, torch.full((extra,), junk, dtype=torch.uint8)])
    assert unpack_bits(packed, bits, len(values)).tolist() == values


def test_padding_bits_are_zero() -> None:
    for bits in BITS:
        packed = pack_bits(torch.full((3,), (1 << bits) - 1), bits)
        pad_bits = 8 * packed.numel() - 3 * bits
        if pad_bits:
            assert int(packed[-1]) >> (8 - pad_bits) == 0


def test_unpack_prefix() -> None:
    # Decoding fewer elements than were packed reads a prefix of the stream.
    idx = torch.randint(0, 32, (50,), generator=torch.Generator().manual_seed(3))
    packed = pack_bits(idx, 5)
    assert torch.equal(unpack_bits(packed, 5, 17), idx[:17].to(torch.uint8))


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, True, "4", None])
def test_bad_bits(bits: object) -> None:
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(4, dtype=torch.int64), bits)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), bits, 4)  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", BITS)
def test_out_of_range_indices(bits: int) -> None:
    with pytest.raises(ValueError, match="lie in"):
        pack_bits(torch.tensor([0, 1 << bits]), bits)
    with pytest.raises(ValueError, match="lie in"):
        pack_bits(torch.tensor([0, -1]), bits)


def test_non_integer_indices() -> None:
    with pytest.raises(ValueError, match="integer dtype"):
        pack_bits(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match=r"torch\.Tensor"):
        pack_bits([0, 1], 2)  # type: ignore[arg-type]


def test_unpack_validation() -> None:
    packed = pack_bits(torch.arange(10) % 8, 3)  # 4 bytes
    with pytest.raises(ValueError, match="too short"):
        unpack_bits(packed[:3], 3, 10)
    with pytest.raises(ValueError, match="too short"):
        unpack_bits(torch.empty(0, dtype=torch.uint8), 1, 1)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(packed.to(torch.int32), 3, 10)
    with pytest.raises(ValueError, match="numel"):
        unpack_bits(packed, 3, -1)
    with pytest.raises(ValueError, match="numel"):
        packed_nbytes(-2, 3)


def test_large_round_trip() -> None:
    # Exercises the vectorised path on a sizeable tensor (well under a second).
    gen = torch.Generator().manual_seed(7)
    for bits in (3, 4, 7):
        idx = torch.randint(0, 1 << bits, (200_003,), generator=gen, dtype=torch.uint8)
        assert torch.equal(unpack_bits(pack_bits(idx, bits), bits, idx.numel()), idx)
