"""How learned levels evolve: per-layer weight-level MSE and movement during QAT at fixed
bits, with levels frozen at their data-driven start against levels learned by Adam or by
SGD with LSQ's scaled gradient, at several learning rates. Writes JSON, markdown and a PNG.

Protocol: the FP32 MobileNetV2 of ``bench_start.py`` (cached), prepared at fixed W{b}A{b}
(adaptive, per-channel weights; first/last layer at 8 bits), calibrated, then trained
``--epochs`` epochs on the 4,000 training digits as ``train_ddq`` trains (SGD with
momentum on the weights, the variant's optimizer on the level parameters, cosine
schedules; the gates are frozen, so nothing is re-fitted). After every epoch, for every layer at ``b`` bits: the
MSE of its learned levels against its current weights relative to the best clipped uniform
grid and to k-means at the same bits, and how far the levels and the weights have moved
from their start (relative L2 change).

    python benchmarks/bench_levels.py                 # minutes on 2 cores
    python benchmarks/bench_levels.py --quick         # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_start import fp32_model, qconfig

import ddq
from ddq.data import create_dataset, make_loaders
from ddq.layers import QuantLayer
from ddq.report import level_quality
from ddq.training import evaluate
from ddq.training.optim import split_parameters


def _snapshot(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: the dequantized levels in use (table x channel scale) and the weight."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer):
            q = m.weight_quantizer
            lv = q.levels()
            cs = q.channel_scales()
            lv = lv[None, :] * cs[:, None] if cs is not None else lv
            out[name] = (lv.clone(), m.weight.detach().clone())
    return out


def _moved(now: torch.Tensor, start: torch.Tensor) -> float:
    return float((now - start).norm() / start.norm().clamp(min=1e-12))


def level_optimizer(variant: str, levels: list) -> torch.optim.Optimizer | None:
    """``frozen``, ``adam:LR`` or ``sgd:LR`` (momentum 0.9, LSQ's scaled gradient)."""
    if variant == "frozen":
        return None
    kind, lr = variant.split(":")
    if kind == "adam":
        return torch.optim.Adam(levels, lr=float(lr))
    if kind == "sgd":
        return torch.optim.SGD(levels, lr=float(lr), momentum=0.9)
    raise ValueError(f"unknown variant {variant!r}: frozen, adam:LR or sgd:LR")


def train_tracked(model, loaders, bits: int, variant: str, args) -> list[dict]:
    train_loader, test_loader = loaders
    weights, levels, _ = split_parameters(model)
    opt_w = torch.optim.SGD(weights, lr=args.lr, momentum=0.9, weight_decay=5e-5)
    opt_q = level_optimizer(variant, levels)
    steps = args.epochs * min(len(train_loader), args.max_steps or 10**9)
    cos = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))  # noqa: E731
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, cos) for o in (opt_w, opt_q) if o]
    start = _snapshot(model)
    history = []

    def record(epoch: int) -> None:
        lq = [r for r in level_quality(model) if r["bits"] == bits]
        snap = _snapshot(model)
        layers = {
            r["name"]: {
                "vs_uniform": r["vs_uniform"], "vs_kmeans": r["vs_kmeans"],
                "levels_moved": _moved(snap[r["name"]][0], start[r["name"]][0]),
                "weights_moved": _moved(snap[r["name"]][1], start[r["name"]][1]),
            }
            for r in lq
        }  # fmt: skip
        med = lambda k: statistics.median(v[k] for v in layers.values())  # noqa: E731
        row = {"epoch": epoch, "acc": evaluate(model, test_loader),
               **{f"median_{k}": med(k) for k in
                  ("vs_uniform", "vs_kmeans", "levels_moved", "weights_moved")},
               "layers": layers}  # fmt: skip
        history.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)

    record(0)
    for epoch in range(args.epochs):
        torch.manual_seed(args.seed * 1_000_003 + epoch)
        train_loader.generator.manual_seed(args.seed * 1_000_003 + epoch)
        model.train()
        for i, (x, y) in enumerate(train_loader):
            if args.max_steps and i >= args.max_steps:
                break
            loss = F.cross_entropy(model(x), y)
            opt_w.zero_grad(set_to_none=True)
            if opt_q:
                opt_q.zero_grad(set_to_none=True)
            loss.backward()
            opt_w.step()
            if opt_q:
                opt_q.step()
            for s in scheds:
                s.step()
        record(epoch + 1)
    return history


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for i, (label, hist) in enumerate(results.items()):
        ep = [h["epoch"] for h in hist]
        c = f"C{i}"  # one colour per variant in every panel
        axes[0].plot(ep, [h["median_vs_uniform"] for h in hist], marker="o", color=c, label=label)
        axes[1].plot(ep, [h["median_levels_moved"] for h in hist], marker="o", color=c,
                     label=f"{label}: levels (solid), weights (dashed)")  # fmt: skip
        axes[1].plot(ep, [h["median_weights_moved"] for h in hist], ls="--", color=c)
        axes[2].plot(ep, [h["acc"] for h in hist], marker="o", color=c, label=label)
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set(title="weight MSE / best clipped uniform (median layer)", xlabel="epoch")
    axes[1].set(title="relative change from the start (median layer)", xlabel="epoch")
    axes[2].set(title="test top-1 %", xlabel="epoch")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--mode", default="adaptive", choices=["adaptive", "uniform"])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--variants", nargs="+", default=["frozen", "adam:0.01", "adam:0.001", "sgd:0.01"],
                   help="level optimizers: frozen, adam:LR, sgd:LR")  # fmt: skip
    p.add_argument("--fp-epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="runs/bench_cache")
    p.add_argument("--out", default="benchmarks/results/levels")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.fp_epochs, args.epochs, args.max_steps = 1, 1, 2
    torch.set_num_threads(1)
    splits = create_dataset("mnist5k", subset=256 if args.quick else None)
    loaders = make_loaders(splits, batch_size=args.batch_size, seed=args.seed)
    fp, fp_acc = fp32_model(args.model, loaders, args)
    results = {}
    for variant in args.variants:
        model = ddq.prepare(copy.deepcopy(fp), qconfig(args.mode, args.bits, True),
                            example_inputs=torch.zeros(1, 1, 28, 28))  # fmt: skip
        loaders[0].generator.manual_seed(args.seed)  # every variant: the same batches
        ddq.calibrate(model, loaders[0], num_batches=1 if args.quick else 8)
        print(variant, flush=True)
        results[variant] = train_tracked(model, loaders, args.bits, variant, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_levels.py " + " ".join(argv or sys.argv[1:])
    meta = {"model": args.model, "mode": args.mode, "bits": args.bits, "fp32_acc": fp_acc,
            "epochs": args.epochs, "command": command, "ddq": ddq.__version__}  # fmt: skip
    (out / "levels.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"# Level learning ({args.model}, {args.mode}, W{args.bits}A{args.bits}, FP32 "
             f"{fp_acc:.2f}%)", "", f"`{command}`", "",
             "| variant | epoch | top-1 % | MSE / best uniform | MSE / k-means | levels moved "
             "| weights moved |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, hist in results.items():
        for h in hist:
            lines.append(
                f"| {label} | {h['epoch']} | {h['acc']:.2f} | {h['median_vs_uniform']:.3f} "
                f"| {h['median_vs_kmeans']:.3f} | {h['median_levels_moved']:.4f} "
                f"| {h['median_weights_moved']:.4f} |"
            )
    lines += ["", "Medians over the layers at the fixed bitwidth; 'moved' is the relative L2 "
              "change from the start of training. Per-layer values are in levels.json."]  # fmt: skip
    (out / "levels.md").write_text("\n".join(lines) + "\n")
    _plot(results, out / "levels.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
