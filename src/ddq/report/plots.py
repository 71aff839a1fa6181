"""Report plots (PNG): bits per layer, learned levels over weight histograms, training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..layers import QuantLayer

__all__ = ["plot_bits", "plot_levels", "plot_training"]

_KIND_COLOURS = {"depthwise": "tab:orange", "pointwise": "tab:blue", "conv": "tab:green",
                 "linear": "tab:purple"}  # fmt: skip


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers or CI
    import matplotlib.pyplot as plt

    return plt


def plot_bits(rows: list[dict[str, Any]], path: Path) -> Path:
    """Weight bits (bars, coloured by kind) and activation bits (markers) per layer."""
    plt = _plt()
    q = [r for r in rows if r["mode"] != "float"]
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(q) + 2), 3.6))
    xs = range(len(q))
    ax.bar(xs, [r["w_bits"] for r in q], color=[_KIND_COLOURS[r["kind"]] for r in q])
    ax.plot(xs, [r["a_bits"] for r in q], "k_", markersize=9, label="activation bits")
    for kind, colour in _KIND_COLOURS.items():
        if any(r["kind"] == kind for r in q):
            ax.bar([0], [0], color=colour, label=f"{kind} weight bits")
    ax.set_xticks(list(xs), [r["name"] for r in q], rotation=90, fontsize=6)
    ax.set_ylabel("bits")
    ax.set_ylim(0, 8.5)
    ax.legend(fontsize=7, ncols=3, loc="upper center", bbox_to_anchor=(0.5, 1.18))
    ax.set_title("bits per layer (early to late)", pad=28, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_levels(model: nn.Module, path: Path, max_layers: int = 4) -> Path:
    """Learned weight levels over the weight histogram, for a few quantized layers."""
    plt = _plt()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]
    if len(layers) > max_layers:
        step = (len(layers) - 1) / (max_layers - 1)
        layers = [layers[round(i * step)] for i in range(max_layers)]
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 2.8), squeeze=False)
    for ax, (name, m) in zip(axes[0], layers, strict=True):
        w = m.weight.detach().float().flatten().cpu()
        ax.hist(w.numpy(), bins=100, color="0.7")
        with torch.no_grad():
            levels = m.weight_quantizer.levels().cpu()
        for v in levels.tolist():
            ax.axvline(v, color="tab:red", lw=0.7)
        ax.set_title(f"{name}\n{m.weight_quantizer.bits}-bit {m.weight_quantizer.mode}", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_training(history: list[dict[str, Any]], path: Path, fp_acc: float | None = None) -> Path:
    """Average bits and test accuracy per epoch."""
    plt = _plt()
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
    a1.plot(ep, [h["avg_w_bits"] for h in history], "o-", label="weights")
    a1.plot(ep, [h["avg_a_bits"] for h in history], "s-", label="activations (MAC-weighted)")
    a1.set_xlabel("epoch")
    a1.set_ylabel("average bits")
    a1.legend(fontsize=7)
    a2.plot(ep, [h["test_acc"] for h in history], "o-", label="DDQ")
    if fp_acc is not None:
        a2.axhline(fp_acc, color="k", ls="--", lw=1, label="FP32")
    a2.set_xlabel("epoch")
    a2.set_ylabel("test accuracy (%)")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
