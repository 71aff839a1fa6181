"""Report plots (PNG): bits per layer, quantization staircases over weight histograms, training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..layers import QuantLayer
from .level_quality import weight_quantizer_snapshot

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


def _pick(items: list[Any], n: int) -> list[Any]:
    """``n`` items spread evenly from first to last (all of them if there are few)."""
    if len(items) <= n:
        return items
    step = (len(items) - 1) / (n - 1)
    return [items[round(i * step)] for i in range(n)]


@torch.no_grad()
def _staircase(m: QuantLayer, points: int = 4001) -> tuple[Any, Any, Any, str]:
    """Normalised weights, and the quantizer's input -> output map sampled over their range.

    Per-channel quantizers map ``w / scale_c`` through one table; the weights are divided by
    their channel's scale and the staircase is that of the table (measured by running the
    quantizer itself on inputs laid out along channel 0's scale).
    """
    wq = weight_quantizer_snapshot(m)
    w = m.weight.detach().float()
    scales = wq.channel_scales()
    if scales is not None:
        scales = scales.to(w.device)
        w = w / scales.view((-1,) + (1,) * (w.dim() - 1))
    w = w.flatten().cpu()
    lo, hi = float(w.min()), float(w.max())
    pad = 0.06 * max(hi - lo, 1e-12)
    xs = torch.linspace(lo - pad, hi + pad, points)
    if scales is None:
        ys = wq(xs.to(m.weight.device, m.weight.dtype)).float().cpu()
    else:
        grid = xs.to(scales.device)[None, :] * scales[:, None]
        ys = (wq(grid.to(m.weight.dtype)).float()[0] / scales[0]).cpu()
    label = "weight / channel scale" if scales is not None else "weight"
    return w.numpy(), xs.numpy(), ys.numpy(), label


def plot_levels(model: nn.Module, path: Path, max_layers: int = 4) -> Path:
    """Weight histograms with each layer's quantization staircase, for a few layers.

    For up to ``max_layers`` quantized layers (spread from first to last): the histogram of
    the weights (divided by their channel's scale for per-channel quantizers; grey, right
    axis) and the quantizer's map from input to quantized value (red staircase, left axis)
    over the same range, with the identity as a dashed line. The flat ends show the
    clipping; at 8 bits the staircase hugs the identity instead of hiding the histogram.
    """
    plt = _plt()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer) and m.quantize]
    layers = _pick(layers, max_layers)
    cols = max(len(layers), 1)
    fig, axes = plt.subplots(1, cols, figsize=(3.2 * cols, 3.0), squeeze=False)
    for ax, (name, m) in zip(axes[0], layers, strict=False):
        w, xs, ys, label = _staircase(m)
        hist = ax.twinx()
        hist.hist(w, bins=120, range=(float(xs[0]), float(xs[-1])), color="0.8")
        hist.set_yticks([])
        ax.set_zorder(hist.get_zorder() + 1)  # the staircase over the histogram
        ax.patch.set_visible(False)
        ax.plot(xs, xs, color="0.45", ls="--", lw=0.6, label="identity")
        ax.plot(xs, ys, color="tab:red", lw=0.9, drawstyle="steps-post", label="quantized")
        ax.set_xlim(float(xs[0]), float(xs[-1]))
        ax.set_ylim(float(xs[0]), float(xs[-1]))
        wq = m.weight_quantizer
        granularity = "per-channel" if wq.channels is not None else "per-tensor"
        ax.set_title(f"{name}\n{wq.bits}-bit {wq.mode}, {granularity}", fontsize=7)
        ax.set_xlabel(label, fontsize=6)
        ax.set_ylabel("quantized value", fontsize=6)
        ax.tick_params(labelsize=6)
    if layers:
        first = axes[0][0]
        handles = first.get_legend_handles_labels()[0] + [
            plt.Rectangle((0, 0), 1, 1, color="0.8", label="weight histogram")
        ]
        first.legend(handles=handles, fontsize=6, loc="upper left", frameon=False)
    else:
        axes[0][0].text(0.5, 0.5, "no quantized layers", ha="center", va="center")
        axes[0][0].set_axis_off()
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
