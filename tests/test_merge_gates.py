"""The Kronecker merge and the ordered gates, against dense explicit formulations."""

import itertools

import pytest
import torch

from ddq.quantizer import kronecker_merge, ordered_gates


def dense_u(g: torch.Tensor) -> torch.Tensor:
    """U(g) = A_1 (x) ... (x) A_K built explicitly (small K only)."""
    eye, ones = torch.eye(2, dtype=g.dtype), torch.ones(2, 2, dtype=g.dtype) / 2
    u = torch.ones(1, 1, dtype=g.dtype)
    for gk in g:
        u = torch.kron(u, gk * eye + (1 - gk) * ones)
    return u


@pytest.mark.parametrize("k_bits", [1, 2, 3, 5])
def test_merge_equals_dense_kronecker_with_soft_gates(k_bits):
    q = torch.randn(2**k_bits, dtype=torch.float64)
    g = torch.rand(k_bits, dtype=torch.float64)
    torch.testing.assert_close(kronecker_merge(q, g), dense_u(g) @ q)


def test_merge_gradients_match_dense():
    q = torch.randn(16, dtype=torch.float64, requires_grad=True)
    g = torch.rand(4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64)
    (kronecker_merge(q, g) @ w).backward()
    gq, gg = q.grad.clone(), g.grad.clone()
    q.grad = g.grad = None
    (dense_u(g) @ q @ w).backward()
    torch.testing.assert_close(gq, q.grad)
    torch.testing.assert_close(gg, g.grad)


@pytest.mark.parametrize("bits", [0, 1, 2, 3, 4])
def test_closed_lsb_gates_average_adjacent_blocks(bits):
    q = torch.sort(torch.randn(16)).values
    g = torch.tensor([1.0] * bits + [0.0] * (4 - bits))
    v = kronecker_merge(q, g)
    m = 2 ** (4 - bits)
    expected = q.reshape(-1, m).mean(1).repeat_interleave(m)
    torch.testing.assert_close(v, expected)
    assert v.unique().numel() <= 2**bits


def test_merge_rejects_wrong_sizes():
    with pytest.raises(ValueError, match="levels"):
        kronecker_merge(torch.zeros(6), torch.ones(3))


def test_gates_are_ordered_and_respect_floor_and_ceiling():
    for signs in itertools.product([-1.0, 1.0], repeat=5):
        g = ordered_gates(torch.tensor(signs), floor=2, ceiling=4)
        assert torch.all(g[:-1] >= g[1:])
        assert g[:2].tolist() == [1.0, 1.0]
        assert g[4] == 0.0


def test_gate_gradient_reaches_open_bits_and_the_first_closed_bit_only():
    logits = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, 1.0], requires_grad=True)
    g = ordered_gates(logits, floor=1, ceiling=6)
    assert g.tolist() == [1, 1, 1, 0, 0, 0]
    g.sum().backward()
    # bit 1 is the floor (no gradient); bits 2, 3 are open, bit 4 is the first closed one.
    assert logits.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
