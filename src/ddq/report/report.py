"""``write_report``: the run's report as markdown + JSON, with PNG plots beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..budget import Budget
from .level_quality import level_quality, summarize_level_quality
from .plots import plot_bits, plot_levels, plot_training
from .tables import layer_rows, totals

__all__ = ["write_report"]

# The level-quality summary singles out the layers at this many bits or fewer.
LOW_BITS = 4


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.2f} kB"


def write_report(
    run_dir: str | Path,
    model: nn.Module,
    result: dict[str, Any],
    history: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write ``report.md``, ``report.json`` and ``plots/*.png`` into ``run_dir``.

    Besides the layer table and totals, the report measures each layer's learned weight
    levels against the best uniform grid and k-means at the same bits
    (:func:`ddq.report.level_quality`), per layer and summarised.

    Args:
        run_dir: the run folder.
        model: the trained, prepared model.
        result: at least ``budget`` (a Budget dict); optionally ``fp_acc``, ``ddq_acc``,
            ``fit_actions``, ``wall_s`` and anything else worth keeping.
        history: per-epoch rows of the training log.

    Example:
        >>> write_report("runs/demo", model, {"budget": {"avg_weight_bits": 4}})  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    budget = Budget(**result["budget"]) if result.get("budget") else None
    rows = layer_rows(model, budget)
    tot = totals(model, budget)
    history = history or []
    lq_rows = level_quality(model)
    lq = {
        "layers": lq_rows,
        "summary": {
            f"bits<={LOW_BITS}": summarize_level_quality(lq_rows, max_bits=LOW_BITS),
            "all": summarize_level_quality(lq_rows),
        },
    }
    files = {
        "bits": plot_bits(rows, plots / "bits_per_layer.png"),
        "levels": plot_levels(model, plots / "levels.png"),
    }
    if history:
        files["training"] = plot_training(history, plots / "training.png", result.get("fp_acc"))
    report = {"result": result, "totals": tot, "layers": rows, "level_quality": lq,
              "history": history,
              "plots": {k: str(v.relative_to(run_dir)) for k, v in files.items()}}  # fmt: skip
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (run_dir / "report.md").write_text(_markdown(result, tot, rows, report["plots"], lq))
    return report


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _level_quality_md(lq: dict[str, Any]) -> list[str]:
    md = ["## Level quality", "",
          "Weight MSE of the learned levels divided by that of two references fitted to the "
          "same weight at the same bits and granularity (per channel or per tensor): the "
          "best clipped uniform grid (MSE-searched step) and k-means levels. Below 1: "
          "better than the reference. Learned levels also serve the task loss, so values "
          "slightly above 1 are expected; far above 1 flags a layer whose levels went wrong. "
          "With few weights per level (small layers at high bits) k-means is nearly exact, "
          "so learned/k-means is large there without meaning much.",
          "", "| layers | n | learned/uniform median | max | learned/k-means median | max |",
          "|---|---|---|---|---|---|"]  # fmt: skip
    for label, s in lq["summary"].items():
        u, k = s["vs_uniform"], s["vs_kmeans"]
        md.append(
            f"| {label.replace('<=', ' <= ')} | {s['layers']} | {_ratio(u['median'])} | "
            f"{_ratio(u['max'])} | {_ratio(k['median'])} | {_ratio(k['max'])} |"
        )
    md += ["", "| layer | bits | learned/uniform | learned/k-means |", "|---|---|---|---|"]
    md += [
        f"| {r['name']} | {r['bits']} | {_ratio(r['vs_uniform'])} | {_ratio(r['vs_kmeans'])} |"
        for r in lq["layers"]
    ]
    md.append("")
    return md


def _markdown(
    result: dict[str, Any],
    tot: dict[str, Any],
    rows: list[dict[str, Any]],
    plots: dict[str, str],
    lq: dict[str, Any] | None = None,
) -> str:
    md = [f"# ddq report: {result.get('model', 'model')} on {result.get('dataset', 'data')}", ""]
    if "budget_description" in tot:
        status = "met" if tot["budget_met"] else "NOT met"
        md += [f"Budget: **{tot['budget_description']}**, {status} "
               f"(usage {100 * tot['budget_usage']:.2f}% of target)", ""]  # fmt: skip
    md += ["| | FP32 | DDQ |", "|---|---|---|"]
    if "fp_acc" in result:
        md.append(
            f"| test accuracy (%) | {result['fp_acc']:.2f} | {result.get('ddq_acc', float('nan')):.2f} |"
        )
    md += [
        f"| size | {_fmt_bytes(tot['fp32_bytes'])} | {_fmt_bytes(tot['size_bytes'])} "
        f"({tot['size_ratio_vs_fp32']:.3f}x) |",
        f"| GBitOps | {tot['fp32_gbitops']:.3f} | {tot['gbitops']:.3f} |",
        f"| average weight bits | 32 | {tot['avg_weight_bits']:.3f} |",
        f"| average activation bits (MAC-weighted) | 32 | {tot['avg_act_bits']:.3f} |",
        "",
    ]
    if "wall_s" in result:
        md += [f"Wall time: {result['wall_s']:.0f} s (FP32 {result.get('fp_wall_s', 0):.0f} s, "
               f"DDQ {result.get('ddq_wall_s', 0):.0f} s).", ""]  # fmt: skip
    md += ["## Conventions", ""]
    md += [f"- {k}: {v}" for k, v in tot["conventions"].items()]
    md += [
        "- size counts quantized weights at their bits, every other parameter and every "
        "per-channel weight scale at 32 bits",
        "- BitOps = sum over conv/linear layers of MACs x weight bits x activation bits",
        "",
    ]
    actions = result.get("fit_actions") or []
    md += ["## Budget guarantee step", ""]
    if actions:
        md.append(
            f"After the learning phase the model was adjusted by {len(actions)} bit(s) "
            "(bits closed: lowest gate logit first; then the slack is spent, reopening the "
            "highest-logit closed bit that fits until none does; the loss change column is "
            "the first-order estimate):"
        )
        md += ["", "| quantizer | bits | est. loss change | budget change |", "|---|---|---|---|"]
        md += [
            f"| {a['quantizer']} | {a['from_bits']} -> {a['to_bits']} | "
            f"{a['est_loss_change']:+.4g} | {a['cost_change']:+.4g} |"
            for a in actions
        ]
    else:
        md.append("Nothing to do: the learned bits already met the budget.")
    md += ["", "## Layers", "",
           "| layer | kind | W bits | A bits | W levels | mode | params | MACs | budget share |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        md.append(
            f"| {r['name']} | {r['kind']} | {r['w_bits']} | {r['a_bits']} | "
            f"{r['w_levels'] or '-'} | {r['mode']} | {r['params']:,} | {r['macs'] or 0:,} | "
            f"{100 * r['budget_share']:.1f}% |"
        )
    md.append("")
    if lq is not None:
        md += _level_quality_md(lq)
    md += ["## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()] + [""]
    return "\n".join(md)
