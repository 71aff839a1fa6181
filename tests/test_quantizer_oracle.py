"""DDQQuantizer against independent oracles: PyTorch's fake-quantize op and autograd
through the explicit ``y = q^T U^T onehot(i(x))`` form."""

import pytest
import torch

from ddq import DDQQuantizer
from ddq.quantizer import ordered_gates


def _away_from_ties(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    """Drop inputs whose rounding is a near-tie (where float paths may legitimately differ)."""
    t = x / scale + zp
    return x[(t - t.floor() - 0.5).abs() > 1e-3]


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(
    "max_bits, bits", [(8, 8), (6, 6), (4, 4), (8, 2), (8, 3), (8, 5), (8, 7), (6, 3)]
)
def test_uniform_with_b_open_gates_equals_fake_quantize_at_step_2_pow_k_minus_b(
    signed, max_bits, bits
):
    """All gates open: the op at the fine step; b open: the same op at 2^(K-b) s."""
    q = DDQQuantizer(max_bits=max_bits, mode="uniform", signed=signed)
    q.init_from(torch.randn(1000) if signed else torch.rand(1000) * 3)
    fine_step = q.uniform_params()[0]
    q.set_bits(bits, trainable=True)
    scale, zp = q.uniform_params()
    assert scale == pytest.approx(fine_step * 2 ** (max_bits - bits))
    assert zp == (2 ** (bits - 1) if signed else 0)
    x = _away_from_ties(torch.randn(20000) * 3, scale, zp).requires_grad_()
    y = q(x)
    ref_x = x.detach().clone().requires_grad_()
    ref = torch.fake_quantize_per_tensor_affine(ref_x, scale, zp, 0, 2**bits - 1)
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-6)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=0)


def _dense_u(g: torch.Tensor) -> torch.Tensor:
    eye, half = torch.eye(2, dtype=g.dtype), torch.ones(2, 2, dtype=g.dtype) / 2
    u = torch.ones(1, 1, dtype=g.dtype)
    for k in range(g.numel()):
        u = torch.kron(u, g[k] * eye + (1 - g[k]) * half)
    return u


def _explicit(quant: DDQQuantizer, x: torch.Tensor) -> torch.Tensor:
    """y = q^T U^T onehot(i(x)) plus the clipped straight-through term for x."""
    q = quant.fine_levels()
    g = ordered_gates(quant.gate_logits, int(quant.floor), int(quant.ceiling))
    qd = q.detach()
    idx = torch.argmin((x.detach()[:, None] - qd[None, :]).abs(), dim=1)
    onehot = torch.nn.functional.one_hot(idx, qd.numel()).to(q.dtype)
    lo = qd[0] - (qd[1] - qd[0]) / 2
    hi = qd[-1] + (qd[-1] - qd[-2]) / 2
    mask = ((x.detach() >= lo) & (x.detach() <= hi)).to(x.dtype)
    y = onehot @ (_dense_u(g) @ q)
    return y + (x - x.detach()) * mask


@pytest.mark.parametrize("mode", ["adaptive", "uniform"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_custom_backward_equals_autograd_through_explicit_form(mode, bits):
    torch.manual_seed(bits)
    quant = DDQQuantizer(max_bits=4, min_bits=1, mode=mode, grad_scale=False)
    quant.init_from(torch.randn(64))
    if mode == "adaptive":  # make the levels genuinely non-uniform
        with torch.no_grad():
            quant.raw_gaps.add_(torch.randn_like(quant.raw_gaps))
    quant.set_bits(bits, trainable=True)
    x = (torch.randn(300) * 1.5).requires_grad_()
    w = torch.randn(300)

    (quant(x) * w).sum().backward()
    ours = {n: p.grad.clone() for n, p in quant.named_parameters()}
    ours_x = x.grad.clone()
    quant.zero_grad()
    x.grad = None

    y_ref = _explicit(quant, x)
    torch.testing.assert_close(quant(x), y_ref.detach(), rtol=0, atol=1e-6)
    (y_ref * w).sum().backward()
    torch.testing.assert_close(ours_x, x.grad)
    for name, p in quant.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-5, atol=1e-5, msg=name)
    # The gate of the first closed bit really gets a task gradient.
    if bits < 4:
        assert ours["gate_logits"][bits].abs() > 0


def test_level_gradient_scaling_is_lsq_factor():
    x = torch.randn(500)
    grads = []
    for scale in (False, True):
        q = DDQQuantizer(max_bits=4, mode="uniform", grad_scale=scale)
        q.init_from(x)
        q(x).pow(2).sum().backward()
        grads.append(q.log_step.grad.item())
    assert grads[1] == pytest.approx(grads[0] / (500 * (2**4 - 1)) ** 0.5, rel=1e-5)
