"""Attention modules that call their projections as ``nn.Linear`` modules.

``nn.MultiheadAttention`` multiplies by its packed ``in_proj_weight`` directly and keeps
its output projection in ``NonDynamicallyQuantizableLinear`` (a subclass ``prepare``
leaves alone); torchvision's Swin attention (``ShiftedWindowAttention`` and its V2) passes
``qkv.weight`` and ``proj.weight`` to ``F.linear``. Neither would see its input quantizer
run, so ``prepare`` could not quantize them. The modules here compute the same functions
(in float, equal up to rounding) with every projection an ``nn.Linear`` child called as a
module, and the rewrites registered at import (see :mod:`ddq.layers.rewrite`)
replace the originals during ``prepare`` and ``ddq.load``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    >>> new = MultiheadSelfOrCrossAttention.from_multihead_attention(mha).eval()
    >>> x = torch.randn(2, 5, 16)
    >>> torch.testing.assert_close(new(x, x, x)[0], mha(x, x, x)[0])
    >>> sorted(n for n, m in new.named_children())
    ['k_proj', 'out_proj', 'q_proj', 'v_proj']
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .rewrite import register_rewrite

__all__ = [
    "MultiheadSelfOrCrossAttention",
    "ShiftedWindowSelfAttention",
    "ShiftedWindowSelfAttentionV2",
]


def _linear_like(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` and ``bias`` (same device and dtype)."""
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (``True`` = not allowed) as an additive float mask; floats pass."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


class MultiheadSelfOrCrossAttention(nn.Module):
    """``nn.MultiheadAttention`` with separate ``q_proj``/``k_proj``/``v_proj`` and a plain
    ``out_proj``, all ``nn.Linear`` modules, so each can be quantized.

    The forward takes ``nn.MultiheadAttention``'s arguments and returns the same
    ``(output, weights or None)``; the attention runs in
    ``F.scaled_dot_product_attention`` unless the weights are asked for. ``is_causal`` is
    a hint about ``attn_mask`` (which must then be given), as in PyTorch.

    The attributes ``in_proj_weight``/``in_proj_bias`` are ``None`` and
    ``_qkv_same_embed_dim`` is ``False``: PyTorch's Transformer fast paths read the packed
    weights through them, and these values make them decline (and call this forward).

    Example:
        >>> att = MultiheadSelfOrCrossAttention(16, 4, batch_first=True)
        >>> out, w = att(torch.randn(2, 5, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16))
        >>> out.shape, w.shape
        (torch.Size([2, 5, 16]), torch.Size([2, 5, 7]))
    """

    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, embed_dim))
        else:
            self.bias_k = self.bias_v = None

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention) -> MultiheadSelfOrCrossAttention:
        """The equivalent module, with ``mha``'s weights copied (the packed input projection
        split into its query, key and value thirds) and its training mode."""
        e = mha.embed_dim
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.embed_dim, new.kdim, new.vdim = e, mha.kdim, mha.vdim
        new.num_heads, new.head_dim = mha.num_heads, mha.head_dim
        new.dropout, new.batch_first = mha.dropout, mha.batch_first
        new.add_zero_attn = mha.add_zero_attn
        if mha._qkv_same_embed_dim:
            wq, wk, wv = mha.in_proj_weight.detach().split(e)
        else:
            wq, wk, wv = (
                p.detach() for p in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            )
        b = mha.in_proj_bias.detach().split(e) if mha.in_proj_bias is not None else (None,) * 3
        new.q_proj = _linear_like(wq, b[0])
        new.k_proj = _linear_like(wk, b[1])
        new.v_proj = _linear_like(wv, b[2])
        op = mha.out_proj
        new.out_proj = _linear_like(
            op.weight.detach(), None if op.bias is None else op.bias.detach()
        )
        if mha.bias_k is not None:
            new.bias_k = nn.Parameter(mha.bias_k.detach().clone())
            new.bias_v = nn.Parameter(mha.bias_v.detach().clone())
        else:
            new.bias_k = new.bias_v = None
        new.train(mha.training)
        return new

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``query`` over ``key``/``value``, as ``nn.MultiheadAttention``.

        Shapes: ``(L, N, E)`` (``(N, L, E)`` with ``batch_first``) or unbatched ``(L, E)``;
        ``key_padding_mask`` ``(N, S)``, ``attn_mask`` ``(L, S)`` or ``(N * heads, L, S)``,
        boolean (``True`` = not attended) or additive float.
        """
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt, _ = query.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        dtype = q.dtype
        # As PyTorch: with nothing to merge into it, the causal hint replaces the mask
        # (SDPA's own causal mask, which also applies to the keys add_bias_kv appends).
        causal = is_causal and key_padding_mask is None and not need_weights
        attn_mask = None if causal else _float_mask(attn_mask, dtype)
        key_padding_mask = _float_mask(key_padding_mask, dtype)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, -1)], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.view(n, tgt, h, d).transpose(1, 2)
        k = k.view(n, k.shape[1], h, d).transpose(1, 2)
        v = v.view(n, v.shape[1], h, d).transpose(1, 2)
        if self.add_zero_attn:  # one all-zero key and value every query may attend to
            k = torch.cat([k, k.new_zeros(n, h, 1, d)], dim=2)
            v = torch.cat([v, v.new_zeros(n, h, 1, d)], dim=2)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src = k.shape[2]
        mask = None
        if attn_mask is not None:
            # (L, S) broadcasts over batch and heads; (N * heads, L, S) is per batch and head.
            mask = attn_mask.view(n, h, tgt, src) if attn_mask.dim() == 3 else attn_mask
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(n, 1, 1, src)
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / d)) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(scores.softmax(dim=-1), p=p) if p > 0 else scores.softmax(dim=-1)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal and mask is None
            )
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """For every (query, key) pair of a window's tokens (row-major), the row of the
    relative-position table: offsets ``(dy, dx)`` shifted to ``0..2w-2`` and flattened."""
    wh, ww = window
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + wh - 1
    dx = xs[:, None] - xs[None, :] + ww - 1
    return (dy * (2 * ww - 1) + dx).flatten()


def _shift_mask(
    size: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Additive mask ``(windows, N, N)`` of the shifted-window scheme: after the cyclic
    shift, the last window of each axis joins pixels from opposite borders, which must not
    attend to each other (-100, Swin's value, not -inf)."""
    (ph, pw), (wh, ww), (sh, sw) = size, window, shift

    def region(length: int, w: int, s: int) -> torch.Tensor:
        # 0 before the last window, 1 in its unshifted part, 2 in the wrapped-around part;
        # with no shift on this axis only the constant-per-window 0/1 split remains.
        i = torch.arange(length, device=device)
        return (i >= length - w).long() + ((i >= length - s).long() if s else 0)

    label = region(ph, wh, sh)[:, None] * 3 + region(pw, ww, sw)[None, :]
    label = label.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    differ = label[:, None, :] != label[:, :, None]
    return torch.zeros(differ.shape, device=device).masked_fill(differ, -100.0)


class ShiftedWindowSelfAttention(nn.Module):
    """Swin's (shifted) window attention with relative position bias (V1), with ``qkv``
    and ``proj`` called as ``nn.Linear`` modules.

    Same parameter and buffer names as torchvision's ``ShiftedWindowAttention``, so a
    state dict of either loads into the other. Input and output are ``(B, H, W, C)``.

    Example:
        >>> att = ShiftedWindowSelfAttention(8, [4, 4], [2, 2], num_heads=2)
        >>> att(torch.randn(1, 6, 6, 8)).shape
        torch.Size([1, 6, 6, 8])
    """

    def __init__(
        self,
        dim: int,
        window_size: list[int],
        shift_size: list[int],
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.window_size = list(window_size)
        self.shift_size = list(shift_size)
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        wh, ww = self.window_size
        self._init_position_bias()
        self.register_buffer("relative_position_index", _relative_position_index((wh, ww)))

    def _init_position_bias(self) -> None:
        wh, ww = self.window_size
        table = torch.zeros((2 * wh - 1) * (2 * ww - 1), self.num_heads)
        self.relative_position_bias_table = nn.Parameter(nn.init.trunc_normal_(table, std=0.02))

    @classmethod
    def from_torchvision(cls, m: nn.Module) -> ShiftedWindowSelfAttention:
        """The equivalent of torchvision's window attention ``m``, sharing its parameters,
        buffers (and submodules) and taking its training mode."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in ("num_heads", "attention_dropout", "dropout"):
            setattr(new, attr, getattr(m, attr))
        new.window_size, new.shift_size = list(m.window_size), list(m.shift_size)
        new._parameters.update(m._parameters)
        new._buffers.update(m._buffers)
        new._modules.update(m._modules)
        new.train(m.training)
        return new

    def position_bias(self) -> torch.Tensor:
        """The relative position bias, ``(heads, N, N)`` for the ``N`` tokens of a window."""
        n = self.window_size[0] * self.window_size[1]
        table = self._bias_table()
        return table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1)

    def _bias_table(self) -> torch.Tensor:
        return self.relative_position_bias_table

    def _scores_scale(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and key as the attention compares them; scaled dot product (V1)."""
        return q * q.shape[-1] ** -0.5, k

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention within (shifted) windows of ``x`` ``(B, H, W, C)``."""
        b, height, width, c = x.shape
        wh, ww = self.window_size
        # Pad to whole windows; a window as large as the map makes the shift pointless.
        x = F.pad(x, (0, 0, 0, (ww - width % ww) % ww, 0, (wh - height % wh) % wh))
        ph, pw = x.shape[1], x.shape[2]
        sh = self.shift_size[0] if wh < ph else 0
        sw = self.shift_size[1] if ww < pw else 0
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        nh, nw = ph // wh, pw // ww
        n = wh * ww
        windows = x.view(b, nh, wh, nw, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, nh * nw, n, c)
        heads = self.num_heads
        qkv = self._qkv(windows).view(b, nh * nw, n, 3, heads, c // heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, windows, heads, N, d)
        q, k = self._scores_scale(q, k)
        mask = self.position_bias()
        if sh or sw:
            mask = mask + _shift_mask((ph, pw), (wh, ww), (sh, sw), x.device)[:, None]
        p = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=1.0)
        out = self.proj(out.transpose(2, 3).reshape(b, nh * nw, n, c))
        out = F.dropout(out, p=self.dropout, training=self.training)
        out = out.view(b, nh, nw, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
        if sh or sw:
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        return out[:, :height, :width].contiguous()


class ShiftedWindowSelfAttentionV2(ShiftedWindowSelfAttention):
    """Swin V2's window attention: cosine similarity with a learned, clamped temperature
    (``logit_scale``), a position bias from a small MLP (``cpb_mlp``) of log-spaced
    offsets, and no key bias. Same names as torchvision's ``ShiftedWindowAttentionV2``.

    The key third of ``qkv.bias`` is not used: the forward subtracts it again, so its
    gradient is exactly zero and it stays at the zero it was initialised to.

    Example:
        >>> att = ShiftedWindowSelfAttentionV2(8, [4, 4], [2, 2], num_heads=2)
        >>> att(torch.randn(1, 8, 8, 8)).shape
        torch.Size([1, 8, 8, 8])
    """

    def _init_position_bias(self) -> None:
        wh, ww = self.window_size
        dy = torch.arange(-(wh - 1), wh, dtype=torch.float32) / (wh - 1)
        dx = torch.arange(-(ww - 1), ww, dtype=torch.float32) / (ww - 1)
        table = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1).unsqueeze(0) * 8
        table = torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0
        self.register_buffer("relative_coords_table", table)
        self.logit_scale = nn.Parameter(torch.full((self.num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, self.num_heads, bias=False)
        )
        if self.qkv.bias is not None:
            with torch.no_grad():
                self.qkv.bias[self.qkv.out_features // 3 : 2 * self.qkv.out_features // 3].zero_()

    def _bias_table(self) -> torch.Tensor:
        return self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)

    def position_bias(self) -> torch.Tensor:
        """``16 sigmoid(.)`` of the MLP's bias, ``(heads, N, N)``."""
        return 16 * torch.sigmoid(super().position_bias())

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        out = self.qkv(x)
        bias = self.qkv.bias
        if bias is None:
            return out
        third = bias.numel() // 3
        return out - F.pad(bias[third : 2 * third], (third, third))

    def _scores_scale(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Cosine similarity times exp(logit_scale), capped at 100.
        temp = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        return F.normalize(q, dim=-1) * temp, F.normalize(k, dim=-1)


def _is_torchvision(module: nn.Module, name: str) -> bool:
    # Compared by name so that ddq's core does not import torchvision.
    t = type(module)
    return t.__name__ == name and t.__module__ == "torchvision.models.swin_transformer"


register_rewrite(
    "nn.MultiheadAttention",
    lambda m: type(m) is nn.MultiheadAttention,
    MultiheadSelfOrCrossAttention.from_multihead_attention,
)
register_rewrite(
    "torchvision.ShiftedWindowAttention",
    lambda m: _is_torchvision(m, "ShiftedWindowAttention"),
    ShiftedWindowSelfAttention.from_torchvision,
)
register_rewrite(
    "torchvision.ShiftedWindowAttentionV2",
    lambda m: _is_torchvision(m, "ShiftedWindowAttentionV2"),
    ShiftedWindowSelfAttentionV2.from_torchvision,
)
