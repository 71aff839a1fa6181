"""Start quality: accuracy after calibration alone (no training) and the level quality of
that start, for MobileNetV2 on the embedded MNIST-5k data. Writes JSON and markdown.

An FP32 model is trained once (``--fp-epochs`` on all 4,000 training digits, cached under
``--cache``) and then, for every mode (adaptive, uniform), weight granularity (per
channel, per tensor) and fixed bitwidth W{b}A{b} (first and last layer at 8 bits), a copy
is prepared and calibrated on 8 training batches, with no training, and evaluated on the
1,000 test digits. Both activation calibration methods are measured (``mse``: MSE-searched
step / Lloyd levels on a subsample, the default; ``percentile``: levels spread over the
0.01%/99.99% quantiles), together with the median weight-level MSE relative to the best
clipped uniform grid and to k-means at the same bits.

    python benchmarks/bench_start.py                  # MobileNetV2, minutes on 2 cores
    python benchmarks/bench_start.py --quick          # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import ddq
from ddq.conversion.presets import preset
from ddq.data import create_dataset, make_loaders
from ddq.models import create_model, load_weights, save_weights
from ddq.report import level_quality
from ddq.training import evaluate, train_float


def qconfig(mode: str, bits: int, per_channel: bool) -> ddq.DDQConfig:
    """Fixed ``bits`` for every weight and input (first/last layer at 8 by convention).

    ``mode`` is ``adaptive`` or ``uniform`` (both quantizers, no output quantizers, as in
    the first measurements), or ``int8``: the preset of that name (adaptive weights,
    uniform activations, and ``integer_graph``'s output quantizers at the same bits, which
    its all-integer graph needs)."""
    cfg = preset(mode, integer_graph=mode == "int8")
    cfg.weight = cfg.weight.replace("bench", bits=bits, min_bits=1, per_channel=per_channel)
    cfg.activation = cfg.activation.replace("bench", bits=bits, min_bits=1, signed=None)
    return cfg


def fp32_model(arch: str, loaders, args) -> tuple[torch.nn.Module, float]:
    """The FP32 reference, trained once and cached (safetensors) under ``args.cache``."""
    train_loader, test_loader = loaders
    model = create_model(arch, num_classes=10, in_channels=1, small_input=True)
    path = Path(args.cache) / f"fp32_{arch}_e{args.fp_epochs}_s{args.seed}.safetensors"
    if path.is_file() and not args.quick:
        load_weights(model, path)
    else:
        torch.manual_seed(args.seed)
        train_float(model, train_loader, test_loader, args.fp_epochs, seed=args.seed,
                    show_progress=False)  # fmt: skip
        if not args.quick:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_weights(model, path)
    return model, evaluate(model, test_loader)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--fp-epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="runs/bench_cache")
    p.add_argument("--out", default="benchmarks/results/start")
    p.add_argument("--modes", nargs="+", default=["adaptive", "uniform"],
                   choices=["adaptive", "uniform", "int8"], help="presets to compare")  # fmt: skip
    p.add_argument("--granularity", nargs="+", default=["per-channel", "per-tensor"],
                   choices=["per-channel", "per-tensor"])  # fmt: skip
    p.add_argument("--act-methods", nargs="+", default=["mse", "percentile"],
                   choices=["mse", "percentile"])  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.fp_epochs, args.bits = 1, [4]
    torch.set_num_threads(1)
    splits = create_dataset("mnist5k", subset=256 if args.quick else None)
    loaders = make_loaders(splits, batch_size=args.batch_size, seed=args.seed)
    fp, fp_acc = fp32_model(args.model, loaders, args)
    example = torch.zeros(1, 1, 28, 28)
    print(f"{args.model} FP32: {fp_acc:.2f}%", flush=True)
    rows = []
    for mode in args.modes:
        for per_channel in (g == "per-channel" for g in args.granularity):
            for bits in args.bits:
                for method in args.act_methods:
                    model = ddq.prepare(copy.deepcopy(fp), qconfig(mode, bits, per_channel),
                                        example_inputs=example)  # fmt: skip
                    t0 = time.time()
                    loaders[0].generator.manual_seed(args.seed)  # the same batches for all
                    ddq.calibrate(model, loaders[0], num_batches=1 if args.quick else 8,
                                  method=method)  # fmt: skip
                    acc = evaluate(model, loaders[1])
                    lq = [r for r in level_quality(model) if r["bits"] == bits]
                    row = {
                        "mode": mode, "per_channel": per_channel, "bits": bits,
                        "act_calibration": method, "acc": acc, "fp32_acc": fp_acc,
                        "delta": acc - fp_acc,
                        "median_vs_uniform": statistics.median(r["vs_uniform"] for r in lq),
                        "median_vs_kmeans": statistics.median(r["vs_kmeans"] for r in lq),
                        "calib_s": time.time() - t0,
                    }  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "fp32_acc": fp_acc, "fp_epochs": args.fp_epochs,
            "seed": args.seed, "torch": torch.__version__, "ddq": ddq.__version__,
            "command": "python benchmarks/bench_start.py " + " ".join(argv or sys.argv[1:])}  # fmt: skip
    (out / "start.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"# Accuracy after calibration alone ({args.model}, MNIST-5k, FP32 {fp_acc:.2f}%)",
        "",
        f"`{meta['command']}`; no training after calibration; first/last layer at 8 bits.",
        "",
        "| mode | weights | W/A bits | act. calibration | top-1 % | vs FP32 "
        "| weight MSE / best uniform (median) | / k-means (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {'per-channel' if r['per_channel'] else 'per-tensor'} "
            f"| W{r['bits']}A{r['bits']} | {r['act_calibration']} | {r['acc']:.2f} "
            f"| {r['delta']:+.2f} | {r['median_vs_uniform']:.3f} | {r['median_vs_kmeans']:.3f} |"
        )
    (out / "start.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
