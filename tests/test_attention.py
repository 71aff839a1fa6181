"""The attention rewrites compute what the modules they replace compute (the oracle is
the original PyTorch/torchvision module on the same inputs, masks included), carry the
state over, are not rewritten again, and make every projection quantizable."""

import copy

import pytest
import torch
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

import ddq
from ddq.layers import QuantLinear
from ddq.layers.attention import (
    MultiheadSelfOrCrossAttention,
    ShiftedWindowSelfAttention,
    ShiftedWindowSelfAttentionV2,
)
from ddq.layers.rewrite import rewrite_modules


def _rewritten(module: nn.Module) -> nn.Module:
    holder = nn.Sequential(copy.deepcopy(module))
    assert rewrite_modules(holder) == ["0"]
    assert rewrite_modules(holder) == []  # the replacement does not match again
    return holder[0]


def _randomize(module: nn.Module) -> None:
    """Non-zero biases (MultiheadAttention starts them at zero), so a dropped one shows."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _mha_inputs(batch_first: bool, cross: bool, kdim: int = 16, vdim: int = 16):
    n, tgt, src = 3, 5, 7 if cross else 5
    q = torch.randn(n, tgt, 16)
    k = torch.randn(n, src, kdim) if cross else q
    v = torch.randn(n, src, vdim) if cross else q
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    return q, k, v, n, tgt, src


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("extras", ["plain", "bias_kv", "zero_attn", "kvdim", "no_bias"])
def test_multihead_attention_equals_torch(batch_first, cross, extras):
    # Eval mode: PyTorch's own fast path where it applies (training mode, its general
    # path, is compared in the gradient test below).
    kw = dict(batch_first=batch_first)
    kdim = vdim = 16
    if extras == "bias_kv":
        kw["add_bias_kv"] = True
    elif extras == "zero_attn":
        kw["add_zero_attn"] = True
    elif extras == "kvdim":
        kdim, vdim = 12, 20
        kw.update(kdim=kdim, vdim=vdim)
    elif extras == "no_bias":
        kw["bias"] = False
    if extras == "kvdim" and not cross:
        pytest.skip("self-attention needs kdim == vdim == embed_dim")
    mha = nn.MultiheadAttention(16, 4, **kw)
    _randomize(mha)
    mha.eval()
    new = _rewritten(mha)
    assert isinstance(new, MultiheadSelfOrCrossAttention) and not new.training
    q, k, v, n, tgt, src = _mha_inputs(batch_first, cross, kdim, vdim)
    kpm = torch.zeros(n, src, dtype=torch.bool)
    kpm[0, -2:] = True
    kpm[2, 0] = True
    causal_float = torch.triu(torch.full((tgt, src), float("-inf")), diagonal=1)
    per_head = torch.randn(n * 4, tgt, src)
    cases = [
        {},
        {"key_padding_mask": kpm},
        {"attn_mask": torch.rand(tgt, src) > 0.7},
        {"attn_mask": causal_float, "key_padding_mask": kpm.float() * -1e4},
        {"attn_mask": per_head, "key_padding_mask": kpm},
        {"attn_mask": causal_float, "is_causal": True},
    ]
    for case in cases:
        # Keep every row some allowed key: a fully masked row is NaN in both.
        if "attn_mask" in case and case["attn_mask"].dtype == torch.bool:
            case["attn_mask"] = case["attn_mask"] & ~torch.eye(tgt, src, dtype=torch.bool)
        for need_weights in (False, True):
            for avg in (True, False):
                args = dict(case, need_weights=need_weights, average_attn_weights=avg)
                want = mha(q, k, v, **args)
                got = new(q, k, v, **args)
                torch.testing.assert_close(got[0], want[0], msg=lambda m, a=args: f"{a}: {m}")
                if need_weights:
                    torch.testing.assert_close(got[1], want[1])
                else:
                    assert got[1] is None and want[1] is None


def test_multihead_attention_unbatched_and_gradients():
    mha = nn.MultiheadAttention(16, 2)
    _randomize(mha)
    new = _rewritten(mha)
    x = torch.randn(5, 16, requires_grad=True)
    kpm = torch.tensor([False, False, True, False, False])
    for args in ({}, {"key_padding_mask": kpm}):
        want, ww = mha(x, x, x, **args)
        got, gw = new(x, x, x, **args)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(gw, ww)
    # Gradients reach the same places: the split projections get in_proj_weight's thirds.
    x2 = torch.randn(4, 2, 16)
    mha(x2, x2, x2)[0].square().sum().backward()
    new(x2, x2, x2)[0].square().sum().backward()
    gq, gk, gv = mha.in_proj_weight.grad.split(16)
    torch.testing.assert_close(new.q_proj.weight.grad, gq)
    torch.testing.assert_close(new.k_proj.weight.grad, gk)
    torch.testing.assert_close(new.v_proj.weight.grad, gv)
    torch.testing.assert_close(new.out_proj.weight.grad, mha.out_proj.weight.grad)


def test_multihead_attention_dropout_is_applied_in_training():
    mha = nn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True)
    new = _rewritten(mha).train()
    x = torch.randn(2, 6, 16)
    a, b = new(x, x, x, need_weights=False)[0], new(x, x, x, need_weights=False)[0]
    assert not torch.equal(a, b)
    new.eval()
    torch.testing.assert_close(new(x, x, x)[0], mha.eval()(x, x, x)[0])


def test_is_causal_without_mask_is_an_error_as_in_torch():
    new = _rewritten(nn.MultiheadAttention(8, 2))
    x = torch.randn(3, 1, 8)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        new(x, x, x, is_causal=True)


def test_transformer_encoder_layer_declines_fast_path_and_matches():
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
    _randomize(layer)
    layer.eval()
    holder = nn.Sequential(copy.deepcopy(layer))
    assert rewrite_modules(holder) == ["0.self_attn"]
    x = torch.randn(2, 6, 16)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, -2:] = True
    with torch.no_grad():
        torch.testing.assert_close(holder(x), layer(x))
        got = holder[0](x, src_key_padding_mask=kpm)
        want = layer(x, src_key_padding_mask=kpm)
    # PyTorch's fast path returns zeros at padded positions; compare the rest.
    keep = ~kpm
    torch.testing.assert_close(got[keep], want[keep])


SWIN_CASES = [
    # dim, window, shift, heads, input (H, W): divisible, padded, shift off, window > map
    (16, [4, 4], [0, 0], 2, (8, 8)),
    (16, [4, 4], [2, 2], 2, (8, 8)),
    (16, [4, 4], [2, 2], 4, (7, 10)),
    (8, [3, 5], [1, 2], 2, (9, 10)),
    (8, [4, 4], [2, 2], 2, (4, 9)),  # one window tall: the height shift switches off
    (8, [8, 8], [4, 4], 1, (5, 6)),
]


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("case", SWIN_CASES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_swin_window_attention_equals_torchvision(v2, case, mode):
    dim, window, shift, heads, (h, w) = case
    cls = ShiftedWindowAttentionV2 if v2 else ShiftedWindowAttention
    orig = cls(dim, window, shift, heads)
    with torch.no_grad():
        orig.qkv.bias.normal_()  # includes the key third V2 ignores: it must stay ignored
        orig.proj.bias.normal_()
        if v2:
            orig.logit_scale.uniform_(1.0, 5.0)  # some heads above the clamp at log(100)
    orig.train(mode == "train")
    new = _rewritten(orig)
    assert type(new) is (ShiftedWindowSelfAttentionV2 if v2 else ShiftedWindowSelfAttention)
    assert new.state_dict().keys() == orig.state_dict().keys()
    x = torch.randn(2, h, w, dim, requires_grad=True)
    want = orig(x)
    got = new(x)
    torch.testing.assert_close(got, want)
    (g_want,) = torch.autograd.grad(want.square().sum(), x)
    (g_got,) = torch.autograd.grad(got.square().sum(), x)
    # V2's temperature (up to 100) amplifies float rounding in the backward pass.
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-4)


def test_swin_v2_key_bias_gets_no_gradient():
    new = _rewritten(ShiftedWindowAttentionV2(8, [4, 4], [2, 2], 2))
    new(torch.randn(1, 8, 8, 8)).sum().backward()
    g = new.qkv.bias.grad
    assert torch.all(g[8:16] == 0) and g[:8].abs().sum() > 0 and g[16:].abs().sum() > 0


def test_fresh_modules_equal_torchvision_construction():
    # The constructors build what torchvision builds (names, shapes, buffers).
    for ours, theirs in (
        (ShiftedWindowSelfAttention, ShiftedWindowAttention),
        (ShiftedWindowSelfAttentionV2, ShiftedWindowAttentionV2),
    ):
        a, b = ours(16, [4, 6], [2, 3], 2), theirs(16, [4, 6], [2, 3], 2)
        assert {k: v.shape for k, v in a.state_dict().items()} == {
            k: v.shape for k, v in b.state_dict().items()
        }
        for name, buf in b.named_buffers():
            torch.testing.assert_close(a.get_buffer(name), buf)
        b.load_state_dict(a.state_dict())
        x = torch.randn(1, 8, 12, 16)
        torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_prepare_quantizes_every_attention_projection():
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    swin = ShiftedWindowAttention(16, [4, 4], [2, 2], 2)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha, self.swin, self.head = mha, swin, nn.Linear(16, 3)

        def forward(self, x):
            b = x.shape[0]
            y = self.swin(x).reshape(b, -1, 16)
            return self.head(self.mha(y, y, y, need_weights=False)[0].mean(1))

    net = ddq.prepare(Net(), example_inputs=torch.randn(2, 8, 8, 16))
    quantized = set(net.ddq_state.quantized)
    want = {"mha.q_proj", "mha.k_proj", "mha.v_proj", "mha.out_proj", "swin.qkv", "swin.proj"}
    assert want <= quantized
    assert all(isinstance(net.get_submodule(n), QuantLinear) for n in want)
    assert not [f for f in net.ddq_state.float_layers if f[0].startswith("mha")]
