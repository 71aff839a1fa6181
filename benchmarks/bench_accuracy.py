"""Accuracy versus budget on the embedded MNIST-5k data: FP32, fixed-bit LSQ-style (ddq
uniform mode with ``set_bits``), brevitas, and DDQ mixed precision (adaptive and uniform)
at the same model sizes; plus ablations. Writes JSON, markdown and PNG.

Protocol (identical for every method): one FP32 model per (architecture, seed), trained
``--fp-epochs``; every quantized method starts from a copy of it and trains
``--qat-epochs`` with the same data order, batch size and weight learning rate. Sizes
count quantized weights at their bits and everything else at 32 bits; the first and last
layer are at 8 bits for every method. DDQ's budget is the byte size of the fixed-bit
model of the same bits (``W{b}A{b}``), with activations capped at ``b`` bits.

Results are cached per run in ``runs.jsonl`` so an interrupted benchmark continues where it
stopped (``--fresh`` starts over).

    python benchmarks/bench_accuracy.py                     # the full table (hours on 2 cores)
    python benchmarks/bench_accuracy.py --quick             # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ddq
from ddq.budget import Budget, CostModel
from ddq.conversion import summary
from ddq.data import create_dataset, make_loaders
from ddq.models import create_model
from ddq.training import TrainConfig, evaluate, train_ddq, train_float


def _qcfg(
    mode: str,
    bits: int | None,
    min_bits: int,
    grad_scale: bool = True,
    act_min_bits: int = 2,
    per_channel: bool = True,
) -> ddq.DDQConfig:
    w = ddq.QuantizerConfig(mode=mode, bits=bits, min_bits=min_bits, grad_scale=grad_scale,
                            per_channel=per_channel)  # fmt: skip
    # Learned activation bits stop at 2: a 1-bit (binary) activation after ReLU6 loses
    # most of the signal, and activations cost nothing in a size budget anyway.
    a = dataclasses.replace(w, signed=None, min_bits=min(act_min_bits, bits or act_min_bits),
                            per_channel=False)  # fmt: skip
    return ddq.DDQConfig(weight=w, activation=a)


def _size_and_bitops(model) -> tuple[float, float, float]:
    cm = CostModel(model)
    return cm.size_bytes(), cm.gbitops(), cm.avg_weight_bits()


def run_one(method: str, bits: int, fp_model, loaders, example, args, seed: int) -> dict:
    """Train one quantized model from a copy of ``fp_model``; return its measurements."""
    train_loader, test_loader = loaders
    model = copy.deepcopy(fp_model)
    tcfg = TrainConfig(epochs=args.qat_epochs, seed=seed, progress=False,
                       max_steps_per_epoch=args.max_steps,
                       lr_gates=args.lr_gates, track_slack=args.track_slack,
                       calib_batches=1 if args.quick else 8,
                       fit_batches=1 if args.quick else 8)  # fmt: skip
    t0 = time.time()
    extra: dict = {}
    if method == "lsq":
        ddq.prepare(model, _qcfg("uniform", bits, 1), example_inputs=example)
        res = train_ddq(model, train_loader, test_loader, Budget(avg_weight_bits=8), tcfg)
        acc = res.test_acc
        size, gbitops, avg = _size_and_bitops(model)
    elif method == "brevitas":
        from brevitas_baseline import brevitas_quantize

        brevitas_quantize(model, bits, example)
        opt = torch.optim.SGD(model.parameters(), lr=tcfg.lr, momentum=0.9, weight_decay=5e-5)
        steps = args.qat_epochs * min(len(train_loader), args.max_steps or 10**9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
        for epoch in range(args.qat_epochs):
            torch.manual_seed(seed * 1_000_003 + epoch)
            train_loader.generator.manual_seed(seed * 1_000_003 + epoch)
            model.train()
            for i, (x, y) in enumerate(train_loader):
                if args.max_steps and i >= args.max_steps:
                    break
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        acc = evaluate(model, test_loader)
        # Same layers, same bits (first/last 8) as the fixed-bit ddq model: same size.
        ref = ddq.prepare(
            copy.deepcopy(fp_model), _qcfg("uniform", bits, 1), example_inputs=example
        )
        size, gbitops, avg = _size_and_bitops(ref)
    else:  # ddq-adaptive / ddq-uniform / ddq-adaptive-{noscale,frozen,pertensor}
        mode = "uniform" if method == "ddq-uniform" else "adaptive"
        if method == "ddq-adaptive-frozen":  # levels stay at their data-driven fit
            tcfg = dataclasses.replace(tcfg, lr_levels=0.0)
        ref = ddq.prepare(
            copy.deepcopy(fp_model), _qcfg("uniform", bits, 1), example_inputs=example
        )
        target = CostModel(ref).size_bytes()  # the W{b}A{b} fixed-bit model's size
        # Weights learn 2..8 bits (ddq's default floor); at the 2-bit size the floor is 1,
        # or every layer would be pinned at 2 with nothing left to allocate.
        floor = 2 if bits > 2 else 1
        ddq.prepare(model, _qcfg(mode, None, floor, grad_scale=method != "ddq-adaptive-noscale",
                                 per_channel=method != "ddq-adaptive-pertensor"),
                    example_inputs=example)  # fmt: skip
        try:
            res = train_ddq(model, train_loader, test_loader,
                            Budget(size_bytes=target, max_act_bits=bits), tcfg)  # fmt: skip
        except FloatingPointError as e:  # diverged: scored at chance, and said so
            print(f"{method} {bits}-bit seed {seed} diverged: {e}", flush=True)
            return {"acc": 10.0, "diverged": True, "size_bytes": target,
                    "gbitops": float("nan"), "avg_w_bits": float("nan"),
                    "wall_s": time.time() - t0, "budget_bytes": target}  # fmt: skip
        acc = res.test_acc
        size, gbitops, avg = _size_and_bitops(model)
        extra["budget_bytes"] = target
        extra["bits_moved_by_fit"] = len(res.fit_actions)
        extra["layers"] = [
            {k: r[k] for k in ("name", "kind", "w_bits", "a_bits", "params")}
            for r in summary(model)
        ]
    return {"acc": acc, "size_bytes": size, "gbitops": gbitops, "avg_w_bits": avg,
            "wall_s": time.time() - t0, **extra}  # fmt: skip


def code_version() -> str:
    """The ddq version and git commit the runs come from (``+dirty`` for uncommitted
    changes under src/ or benchmarks/), so a table never mixes results of different code."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src", "benchmarks"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ddq.__version__
    return f"{ddq.__version__}+{commit}" + ("+dirty" if dirty else "")


def _base_key(arch: str, seed: int, settings: dict) -> str:
    """Cache key of one (architecture, seed) under the protocol settings."""
    return json.dumps({"arch": arch, "seed": seed, **settings}, sort_keys=True)


def _plan(args) -> list[tuple[str, int]]:
    plan = [("lsq", b) for b in args.lsq_bits if "lsq" in args.methods and b not in args.bits]
    for b in args.bits:
        for m in args.methods:
            if m != "fp32":
                plan.append((m, b))
    for m, b in args.ablations:
        plan.append((m, b))
    return plan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    p.add_argument("--lsq-bits", nargs="*", type=int, default=[8],
                   help="extra bitwidths run by the fixed-bit baseline only (W8A8)")  # fmt: skip
    p.add_argument("--methods", nargs="+",
                   default=["fp32", "lsq", "brevitas", "ddq-adaptive", "ddq-uniform"])  # fmt: skip
    p.add_argument("--ablation", dest="ablations", nargs=2, action="append",
                   metavar=("METHOD", "BITS"), default=None,
                   help="extra runs, e.g. --ablation ddq-adaptive-noscale 3")  # fmt: skip
    p.add_argument("--subset", type=int, default=None, help="training examples (default all)")
    p.add_argument("--fp-epochs", type=int, default=4)
    p.add_argument("--qat-epochs", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=None, help="steps per epoch cap")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr-gates", type=float, default=TrainConfig.lr_gates,
                   help="gate learning rate (raise it for short schedules)")  # fmt: skip
    p.add_argument("--track-slack", type=lambda v: None if v == "none" else float(v),
                   default=TrainConfig.track_slack,
                   help="budget tracker slack for DDQ ('none': multiplier only)")  # fmt: skip
    p.add_argument("--width-mult", type=float, default=1.0, help="mobilenet_v2 width")
    p.add_argument("--out-dir", default="benchmarks/results/accuracy")
    p.add_argument("--fresh", action="store_true", help="ignore cached runs")
    p.add_argument("--code", default=None,
                   help="code version whose cached runs to use (default: this checkout's)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smoke test: tiny everything")
    p.add_argument("--report-only", action="store_true",
                   help="write the tables and plots from the cached runs; train nothing")  # fmt: skip
    args = p.parse_args(argv)
    if args.ablations is None:
        args.ablations = [] if args.quick else [("ddq-adaptive-noscale", 3)]
    args.ablations = [(m, int(b)) for m, b in args.ablations]
    if args.quick:
        args.models, args.seeds, args.bits, args.lsq_bits = ["mobilenet_v2"], [0], [4], []
        args.subset, args.fp_epochs, args.qat_epochs, args.max_steps = 64, 1, 1, 1
        args.batch_size = 32
        args.width_mult = 0.25
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "runs.jsonl"
    cache: dict[str, dict] = {}
    if cache_path.is_file() and not args.fresh:
        for line in cache_path.read_text().splitlines():
            rec = json.loads(line)
            cache[rec["key"]] = rec
    elif args.fresh:
        cache_path.unlink(missing_ok=True)

    settings = {k: getattr(args, k) for k in ("subset", "fp_epochs", "qat_epochs", "max_steps",
                                              "batch_size", "width_mult", "lr_gates")}  # fmt: skip
    if args.track_slack != TrainConfig.track_slack:  # keyed only when changed: old keys stay valid
        settings["track_slack"] = args.track_slack
    settings["code"] = args.code or code_version()
    splits = create_dataset("mnist5k", subset=args.subset)
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    torch.set_num_threads(torch.get_num_threads())
    for arch in [] if args.report_only else args.models:
        kw = {"width_mult": args.width_mult} if arch == "mobilenet_v2" else {}
        for seed in args.seeds:
            loaders = make_loaders(splits, args.batch_size, seed=seed)
            base_key = _base_key(arch, seed, settings)
            torch.manual_seed(seed)
            fp_model = create_model(arch, num_classes=10, in_channels=1, small_input=True, **kw)
            fp_key = base_key + "|fp32"
            fp_state_path = out / f"fp32_{arch}_seed{seed}.pt"
            if fp_key in cache and fp_state_path.is_file():
                fp_model.load_state_dict(torch.load(fp_state_path, weights_only=True))
            else:
                t0 = time.time()
                acc = train_float(fp_model, *loaders, epochs=args.fp_epochs, seed=seed,
                                  show_progress=False)  # fmt: skip
                torch.save(fp_model.state_dict(), fp_state_path)
                ref = ddq.prepare(copy.deepcopy(fp_model), example_inputs=example)
                cm = CostModel(ref)
                rec = {"key": fp_key, "arch": arch, "seed": seed, "method": "fp32", "bits": 32,
                       "acc": acc, "size_bytes": cm.fp32_bytes(), "gbitops": cm.fp32_gbitops(),
                       "avg_w_bits": 32.0, "wall_s": time.time() - t0}  # fmt: skip
                cache[fp_key] = rec
                with cache_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"{arch} seed {seed} fp32: {acc:.2f}%", flush=True)
            for method, bits in _plan(args):
                key = f"{base_key}|{method}|{bits}"
                if key in cache:
                    continue
                r = run_one(method, bits, fp_model, loaders, example, args, seed)
                rec = {"key": key, "arch": arch, "seed": seed, "method": method, "bits": bits, **r}
                cache[key] = rec
                with cache_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"{arch} seed {seed} {method} {bits}-bit: {r['acc']:.2f}% "
                      f"({r['size_bytes'] / 1e3:.1f} kB, {r['wall_s']:.0f} s)", flush=True)  # fmt: skip
    records = [
        r for r in cache.values()
        if r["arch"] in args.models and r["seed"] in args.seeds
        and r["key"].split("|")[0] == _base_key(r["arch"], r["seed"], settings)
    ]  # fmt: skip
    write_outputs(records, out, args)
    return 0


def _mean_finite(values) -> float:
    """Mean over the runs that have the value (a diverged run has no final size or bits)."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.mean(finite) if finite else float("nan")


def aggregate(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["arch"], r["method"], r["bits"]), []).append(r)
    rows = []
    for (arch, method, bits), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        accs = [r["acc"] for r in rs]
        rows.append({
            "arch": arch, "method": method, "bits": bits, "n_seeds": len(rs),
            "per_seed": {r["seed"]: r["acc"] for r in rs},
            "diverged": [r["seed"] for r in rs if r.get("diverged")],
            "acc_mean": statistics.mean(accs),
            "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "size_bytes": _mean_finite(r["size_bytes"] for r in rs),
            "gbitops": _mean_finite(r["gbitops"] for r in rs),
            "avg_w_bits": _mean_finite(r["avg_w_bits"] for r in rs),
            "wall_s": statistics.mean(r["wall_s"] for r in rs),
        })  # fmt: skip
    return rows


def goal_table(rows: list[dict]) -> list[str]:
    """The issue's goals: DDQ at the 4-bit size within 0.3 pt of FP32; at smaller sizes at
    least 1 pt above the best fixed-bit baseline (lsq or brevitas). Means are taken over the
    seeds that every compared method has run, so the comparison is paired."""
    by = {(r["arch"], r["method"], r["bits"]): r for r in rows}
    lines = ["Goals (means over the seeds all methods share; DDQ = the better of its modes):", "",
             "| model | size of | seeds | FP32 | best fixed-bit | DDQ adaptive | DDQ uniform | "
             "DDQ - best fixed | DDQ - FP32 | goal | met |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for arch in sorted({r["arch"] for r in rows}):
        for bits in sorted({r["bits"] for r in rows if r["arch"] == arch and r["bits"] < 8},
                           reverse=True):  # fmt: skip
            methods = ["fp32", "lsq", "brevitas", "ddq-adaptive", "ddq-uniform"]
            got = {m: by[(arch, m, 32 if m == "fp32" else bits)]["per_seed"] for m in methods
                   if (arch, m, 32 if m == "fp32" else bits) in by}  # fmt: skip
            fixed = [m for m in ("lsq", "brevitas") if m in got]
            ddqs = [m for m in ("ddq-adaptive", "ddq-uniform") if m in got]
            if "fp32" not in got or not fixed or not ddqs:
                continue
            seeds = sorted(set.intersection(*(set(v) for v in got.values())))
            if not seeds:
                continue
            mean = {m: statistics.mean(got[m][s] for s in seeds) for m in got}
            best = max(fixed, key=lambda m: mean[m])
            top = max(mean[m] for m in ddqs)
            d_fixed, d_fp = top - mean[best], top - mean["fp32"]
            d_fixed, d_fp = round(d_fixed, 2), round(d_fp, 2)  # as printed, not float noise
            goal, met = (("within 0.3 of FP32", d_fp >= -0.3) if bits >= 4
                         else (">= 1 above best fixed", d_fixed >= 1.0))  # fmt: skip
            cell = {m: f"{mean[m]:.2f}" if m in mean else "" for m in methods}
            lines.append(f"| {arch} | W{bits}A{bits} | {','.join(map(str, seeds))} | "
                         f"{cell['fp32']} | {cell[best]} ({best}) | {cell['ddq-adaptive']} | "
                         f"{cell['ddq-uniform']} | {d_fixed:+.2f} | {d_fp:+.2f} | {goal} | "
                         f"{'yes' if met else 'no'} |")  # fmt: skip
    return lines


def write_outputs(records: list[dict], out: Path, args) -> None:
    rows = aggregate(records)
    if not rows:
        print(f"no runs in {out / 'runs.jsonl'} match these models, seeds and settings")
        return
    (out / "accuracy.json").write_text(json.dumps(
        {"settings": vars(args) | {"ablations": args.ablations}, "rows": rows,
         "runs": records, "torch": torch.__version__, "threads": torch.get_num_threads()},
        indent=2, default=str) + "\n")  # fmt: skip
    md = ["| model | method | bits | seeds | top-1 (%) mean ± std | per seed | size (kB) | GBitOps | avg W bits |",
          "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        per_seed = " / ".join(f"{a:.1f}" + ("*" if s in r["diverged"] else "")
                              for s, a in r["per_seed"].items())  # fmt: skip
        md.append(f"| {r['arch']} | {r['method']} | {r['bits']} | {r['n_seeds']} | "
                  f"{r['acc_mean']:.2f} ± {r['acc_std']:.2f} | {per_seed} | {r['size_bytes'] / 1e3:.1f} | "
                  f"{r['gbitops']:.3f} | {r['avg_w_bits']:.2f} |")  # fmt: skip
    if any(r["diverged"] for r in rows):
        md += ["", "\\* training diverged (NaN or Inf): scored at chance, 10%."]
    md += ["", *goal_table(rows)]
    (out / "accuracy.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    _plots(rows, records, out)


def _plots(rows: list[dict], records: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    archs = sorted({r["arch"] for r in rows})
    for xkey, xlabel, fname in (("size_bytes", "model size (kB)", "pareto_size.png"),
                                ("gbitops", "GBitOps", "pareto_bitops.png")):  # fmt: skip
        fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4), squeeze=False)
        for ax, arch in zip(axes[0], archs, strict=True):
            for method in sorted({r["method"] for r in rows if r["arch"] == arch}):
                rs = sorted((r for r in rows if r["arch"] == arch and r["method"] == method),
                            key=lambda r: r[xkey])  # fmt: skip
                xs = [r[xkey] / (1e3 if xkey == "size_bytes" else 1) for r in rs]
                ax.errorbar(xs, [r["acc_mean"] for r in rs], yerr=[r["acc_std"] for r in rs],
                            marker="o", capsize=3, label=method)  # fmt: skip
            ax.set_xscale("log")
            # Plain numbers at 1-2-5 steps: matplotlib's default minor labels on a log axis
            # ("3x10^3 4x10^3") overlap when the range spans about one decade.
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(xlabel)
            ax.set_ylabel("top-1 (%)")
            ax.set_title(arch)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
    # Per-layer bits chosen for mobilenet_v2 (first seed, adaptive, each budget).
    chosen = [r for r in records if r["arch"] == "mobilenet_v2" and r["method"] == "ddq-adaptive"]
    if chosen:
        seed0 = min(r["seed"] for r in chosen)
        chosen = sorted((r for r in chosen if r["seed"] == seed0), key=lambda r: -r["bits"])
        fig, axes = plt.subplots(len(chosen), 1, figsize=(12, 2.6 * len(chosen)), squeeze=False)
        colours = {"depthwise": "tab:orange", "pointwise": "tab:blue", "conv": "tab:green",
                   "linear": "tab:purple"}  # fmt: skip
        lines = ["| budget | depthwise avg W bits | pointwise avg W bits | first half | second half |",
                 "|---|---|---|---|---|"]  # fmt: skip
        for ax, r in zip(axes[:, 0], chosen, strict=True):
            layers = r["layers"]
            ax.bar(range(len(layers)), [lay["w_bits"] for lay in layers],
                   color=[colours[lay["kind"]] for lay in layers])  # fmt: skip
            ax.set_ylabel("W bits")
            ax.set_title(
                f"mobilenet_v2, DDQ adaptive, size of W{r['bits']}A{r['bits']}", fontsize=9
            )
            ax.set_ylim(0, 8.5)

            def avg(ls):
                n = sum(lay["params"] for lay in ls)
                return sum(lay["w_bits"] * lay["params"] for lay in ls) / n if n else float("nan")

            half = len(layers) // 2
            lines.append(f"| W{r['bits']} size | {avg([x for x in layers if x['kind'] == 'depthwise']):.2f} | "
                         f"{avg([x for x in layers if x['kind'] == 'pointwise']):.2f} | "
                         f"{avg(layers[:half]):.2f} | {avg(layers[half:]):.2f} |")  # fmt: skip
        axes[-1, 0].set_xticks(range(len(chosen[-1]["layers"])),
                               [lay["name"] for lay in chosen[-1]["layers"]], rotation=90, fontsize=6)  # fmt: skip
        fig.tight_layout()
        fig.savefig(out / "mobilenet_v2_bits.png", dpi=120)
        plt.close(fig)
        (out / "mobilenet_v2_bits.md").write_text(
            "Parameter-weighted average weight bits chosen by DDQ (adaptive):\n\n"
            + "\n".join(lines) + "\n")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
