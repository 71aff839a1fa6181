"""How good are the learned weight levels? Their MSE against data-driven reference grids.

For every quantized layer, the error of the weight quantizer as the model uses it is put
beside two references fitted to the same weight at the same bitwidth and with the same
structure (per channel or per tensor):

- the best clipped uniform grid (``fitting.best_uniform_step``: the MSE-searched step of
  the b-bit integer grid, what post-training int quantizers use), and
- k-means levels (``fitting.lloyd_levels`` per tensor, ``fitting.fit_table_and_scales``
  per channel: one table times a scale per output channel).

A ratio ``vs_uniform`` below 1 means the learned levels fit the weight better than the
best uniform grid; ``vs_kmeans`` near 1 means they are as good as a k-means fit of the
weight alone. Learned levels also answer to the task loss, so ratios a little above 1
after training are expected; ratios far above 1 point at a layer whose levels went wrong.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

import torch
from torch import nn

from ..layers import QuantLayer
from ..quantizer import DDQQuantizer
from ..quantizer.fitting import (
    best_uniform_step,
    fit_table_and_scales,
    lloyd_levels,
    quantize_to_levels,
    table_mse,
    uniform_quantize,
)

__all__ = ["level_quality", "summarize_level_quality"]

# Errors are measured on at most this many weights per layer (every s-th weight of each
# output channel): plenty for a ratio of MSEs, and it keeps the k-means reference (several
# dozen passes over the weight) to about a second for the largest layers.
MAX_SAMPLE = 1 << 18


def _columns(w: torch.Tensor, max_sample: int = MAX_SAMPLE) -> slice:
    """The strided slice of each channel's weights (axis 0) that is measured."""
    return slice(None, None, -(-w.numel() // max_sample))


def _ratio(num: float, den: float, scale: float) -> float:
    """``num / den``, with an exact reference (``den`` ~ 0) giving 1 (also exact) or inf."""
    eps = max(scale * 1e-12, 1e-30)
    if den <= eps:
        return 1.0 if num <= eps else float("inf")
    return num / den


@torch.no_grad()
def weight_quantizer_snapshot(layer: QuantLayer) -> DDQQuantizer:
    """A copy of ``layer``'s weight quantizer as the model's next forward would use it.

    In eval mode, enabled, initialised and re-fitted to the weight if its bitwidth moved
    since its last fit (what the layer's own forward would do), then frozen there
    (``refit_on_bits`` off) so that it can be applied to other inputs. The model is
    left untouched.
    """
    wq = copy.deepcopy(layer.weight_quantizer)
    wq.enabled, wq.calibrating = True, False
    if not bool(wq.initialized):
        wq.init_from(layer.weight)  # what the first training forward would do
    wq.eval()
    wq(layer.weight.detach())  # re-fits here if the bitwidth moved
    wq.refit_on_bits = False
    return wq


@torch.no_grad()
def _learned_mse(layer: QuantLayer, cols: slice) -> float:
    weight = layer.weight.detach()
    err = (weight_quantizer_snapshot(layer)(weight).float() - weight.float()).square()
    return float(err.reshape(weight.shape[0], -1)[:, cols].mean())


@torch.no_grad()
def _uniform_mse(rows: torch.Tensor, bits: int, signed: bool, per_channel: bool) -> float:
    if per_channel:
        step = best_uniform_step(rows, bits, signed, channel_axis=0)[:, None]
    else:
        step = best_uniform_step(rows, bits, signed)
    return float((uniform_quantize(rows, step, bits, signed) - rows).square().mean())


@torch.no_grad()
def _kmeans_mse(rows: torch.Tensor, bits: int, per_channel: bool) -> float:
    if per_channel and rows.shape[0] > 1:
        return table_mse(rows, *fit_table_and_scales(rows, 2**bits))
    levels = lloyd_levels(rows, 2**bits)
    return float((quantize_to_levels(rows, levels) - rows).square().mean())


def level_quality(model: nn.Module) -> list[dict[str, Any]]:
    """Per quantized layer: weight MSE of the learned levels against uniform and k-means.

    For every ``QuantLayer`` with ``quantize`` on, at the layer's current bitwidth ``b``:

    - ``mse_learned``: ``mean((wq(w) - w)**2)``, the weight quantizer as the model uses it
      (eval mode, on a copy, so the model is left untouched);
    - ``mse_uniform``: the best clipped uniform ``b``-bit grid, per channel (axis 0) when
      the quantizer is per-channel, else per tensor;
    - ``mse_kmeans``: k-means with ``2**b`` levels, as one table times per-channel scales
      when the quantizer is per-channel, else one set of levels per tensor;
    - ``vs_uniform = mse_learned / mse_uniform`` and ``vs_kmeans = mse_learned /
      mse_kmeans`` (below 1: better than the reference; an exact reference gives 1 if the
      learned levels are exact too, else ``inf``);
    - ``name``, ``bits``, ``mode``, ``per_channel``, ``numel``, and ``measured``: how many
      weights the errors are measured on (layers over ``MAX_SAMPLE`` weights: every s-th
      weight of each output channel; the references are fitted to the same weights).

    The references are fitted from scratch, dozens of passes over each (sampled) weight:
    a second or so per large layer, meant for reports, not for every training step.

    Example:
        >>> import ddq, torch
        >>> from torch import nn
        >>> cfg = ddq.DDQConfig(weight=ddq.QuantizerConfig(bits=3), first_last_bits="learn")
        >>> net = ddq.prepare(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)), cfg)
        >>> rows = level_quality(net)
        >>> [(r["name"], r["bits"], r["mode"]) for r in rows]
        [('0', 3, 'adaptive'), ('2', 3, 'adaptive')]
        >>> all(r["vs_kmeans"] < 1.01 for r in rows)  # adaptive levels start as k-means
        True
    """
    out: list[dict[str, Any]] = []
    for name, m in model.named_modules():
        if not isinstance(m, QuantLayer) or not m.quantize:
            continue
        wq = getattr(m, "weight_quantizer", None)
        if wq is None:
            continue
        w = m.weight.detach().float().cpu()  # the references are fitted on the CPU
        if w.numel() == 0:
            continue
        bits = wq.bits
        signed = wq.signed if wq.signed is not None else bool((w < 0).any())
        per_channel = wq.channels is not None
        cols = _columns(w)
        rows = w.reshape(w.shape[0], -1)[:, cols].contiguous()
        learned = _learned_mse(m, cols)
        uniform = _uniform_mse(rows, bits, signed, per_channel)
        kmeans = _kmeans_mse(rows, bits, per_channel)
        scale = float(rows.square().mean())
        out.append(
            {
                "name": name,
                "bits": bits,
                "mode": wq.mode,
                "per_channel": per_channel,
                "numel": w.numel(),
                "measured": rows.numel(),
                "mse_learned": learned,
                "mse_uniform": uniform,
                "mse_kmeans": kmeans,
                "vs_uniform": _ratio(learned, uniform, scale),
                "vs_kmeans": _ratio(learned, kmeans, scale),
            }
        )
    return out


def summarize_level_quality(
    rows: list[dict[str, Any]], max_bits: int | None = None
) -> dict[str, Any]:
    """Median, min and max of ``vs_uniform`` and ``vs_kmeans`` over the layers of ``rows``.

    Args:
        rows: the output of :func:`level_quality`.
        max_bits: only layers at ``max_bits`` bits or fewer (e.g. 4: the layers where the
            choice of levels matters most); ``None`` for all.

    Returns:
        ``{"layers": n, "max_bits": max_bits, "vs_uniform": {"median", "min", "max"},
        "vs_kmeans": {...}}``; the statistics are ``None`` when no layer qualifies.

    Example:
        >>> rows = [{"bits": 3, "vs_uniform": 0.8, "vs_kmeans": 1.1},
        ...         {"bits": 8, "vs_uniform": 1.0, "vs_kmeans": 1.0}]
        >>> summarize_level_quality(rows, max_bits=4)["vs_uniform"]
        {'median': 0.8, 'min': 0.8, 'max': 0.8}
    """
    chosen = [r for r in rows if max_bits is None or r["bits"] <= max_bits]
    summary: dict[str, Any] = {"layers": len(chosen), "max_bits": max_bits}
    for key in ("vs_uniform", "vs_kmeans"):
        values = [float(r[key]) for r in chosen]
        summary[key] = (
            {"median": statistics.median(values), "min": min(values), "max": max(values)}
            if values
            else {"median": None, "min": None, "max": None}
        )
    return summary
