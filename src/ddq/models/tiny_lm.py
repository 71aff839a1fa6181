"""A small causal transformer language model whose every matrix product is an ``nn.Linear``.

``TinyLM`` is the non-vision model of ``ddq``'s examples (``examples/language_model.py``):
pre-LayerNorm blocks of multi-head causal self-attention (separate ``q``/``k``/``v``/``out``
``nn.Linear`` projections) and a two-layer GELU MLP, then a final LayerNorm and a linear
LM head. ``ddq.prepare`` quantizes every one of those ``nn.Linear`` layers.

Float by design, as ``ddq`` quantizes ``Conv1d``/``Conv2d``/``Linear`` only: the token and
position embeddings (``nn.Embedding``, a table lookup, not a product), the LayerNorms, the
biases, and the two attention products (``q k^T`` and ``softmax(.) v``, activation times
activation) inside ``F.scaled_dot_product_attention``. The head is not tied to the token
embedding, so the head can be quantized while the embedding stays float without storing
one tensor twice.

It is not in the model registry: the registry's builders map images to class logits
(``builder(num_classes, in_channels, small_input)``); rebuild it for ``ddq.load`` with
``model_factory=lambda arch: TinyLM(**arch["kwargs"])`` and ``arch=tiny_lm.arch()`` at
export.

Example:
    >>> model = TinyLM(vocab_size=256, d_model=32, n_layers=2, n_heads=2, seq_len=16)
    >>> model(torch.zeros(3, 16, dtype=torch.long)).shape
    torch.Size([3, 16, 256])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Block", "CausalSelfAttention", "TinyLM"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with four ``nn.Linear`` projections.

    Example:
        >>> attn = CausalSelfAttention(d_model=8, n_heads=2)
        >>> attn(torch.randn(1, 5, 8)).shape
        torch.Size([1, 5, 8])
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_heads

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True
        )
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``.

    Example:
        >>> Block(d_model=8, n_heads=2)(torch.randn(2, 4, 8)).shape
        torch.Size([2, 4, 8])
    """

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """A causal transformer language model: tokens ``(B, T)`` -> next-token logits ``(B, T, V)``.

    Args:
        vocab_size: number of token values (256 for bytes).
        d_model: width of the residual stream.
        n_layers: number of transformer blocks.
        n_heads: attention heads per block (``d_model`` must be a multiple).
        seq_len: longest context (size of the learned position table).
        mlp_ratio: hidden width of the MLP over ``d_model``.

    Example:
        >>> lm = TinyLM(d_model=16, n_layers=1, n_heads=2, seq_len=8)
        >>> sum(isinstance(m, nn.Linear) for m in lm.modules())  # q, k, v, out, fc1, fc2, head
        7
        >>> TinyLM(**lm.arch()["kwargs"]).arch() == lm.arch()
        True
    """

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        seq_len: int = 128,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        self._kwargs = dict(
            vocab_size=vocab_size,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            seq_len=seq_len,
            mlp_ratio=mlp_ratio,
        )
        self.seq_len = seq_len
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # GPT-2's initialisation: N(0, 0.02) weights, zero biases; PyTorch's default
        # fan-in uniform for Linear trains noticeably slower for a transformer.
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def arch(self) -> dict[str, Any]:
        """The architecture record for ``ddq.export(arch=...)``: rebuild with ``TinyLM(**kwargs)``."""
        return {"name": "tiny_lm", "kwargs": dict(self._kwargs)}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # No Python check on the length (torch.fx could not trace it): a sequence longer
        # than ``seq_len`` fails in the position lookup with an IndexError.
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
