"""Training-step time of DDQ against FP32, fixed-bit (LSQ-style) and brevitas QAT.

One step = forward, cross-entropy, backward and the optimizer step(s) on one batch, as in
``bench_accuracy.py`` (batch 32, 28x28 MNIST-sized input, small-input stems). Cases per
model:

- ``fp32``: the float model, SGD;
- ``lsq_w4a4``: ddq's uniform mode with bits fixed at 4 (first/last 8) trained as
  ``bench_accuracy.py`` trains it: ``train_ddq``'s step with an 8-bit budget;
- ``brevitas_w4a4``: brevitas integer quantizers at 4 bits (first/last 8), SGD (skipped
  when brevitas is not installed);
- ``ddq_uniform`` / ``ddq_adaptive``: learned bits (2..8) under an average-4-bit budget.

The ddq cases run the real step of ``train_ddq``, through the public lifecycle
(``ddq.DDQTrainer``): the task loss plus ``trainer.penalty()``, the ``DDQOptimizer``
step (SGD on the weights, Adam on levels and gates, the cosine schedules) and
``trainer.step()`` (the dual update, the annealing and, for the learned-bit cases, the
opt-in budget tracker, ``TrainConfig.track_slack``; off by default, so the figure is an
upper bound on a default step). Every timed step is in the learning phase (bits not yet
frozen), the costlier one.

Every repeat runs every case once in a shuffled order so a shared machine's load falls
on all alike; medians after warm-up are reported in ms and as ratios to ``fp32`` (and to
``brevitas_w4a4``) measured in the same run. One intra-op thread by default.

    PYTHONPATH=src python benchmarks/bench_train_step.py            # mobilenet_v2, resnet18
    PYTHONPATH=src python benchmarks/bench_train_step.py --quick    # smoke test (seconds)

Writes ``train_step.json`` and ``train_step.md`` to ``--out-dir`` and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_accuracy import _qcfg

import ddq
from ddq.budget import Budget
from ddq.models import create_model
from ddq.training import DDQTrainer, TrainConfig


def _step_fn(
    case: str, fp: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int
) -> Callable[[], None]:
    """Build the model of ``case`` from ``fp`` and return a closure running one step.

    ``steps`` is how many steps will be run: the ddq lifecycle's learning phase (before
    its budget fit) covers all of them.
    """
    model = copy.deepcopy(fp)
    example = x[:1]
    if case == "fp32" or case.startswith("brevitas"):
        if case.startswith("brevitas"):
            from brevitas_baseline import brevitas_quantize

            brevitas_quantize(model, 4, example)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model.train()

        def float_step() -> None:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return float_step

    mode = "adaptive" if case == "ddq_adaptive" else "uniform"
    fixed = case.startswith("lsq")
    ddq.prepare(model, _qcfg(mode, 4 if fixed else None, min_bits=2), example_inputs=example)
    if fixed:  # what bench_accuracy.py trains its fixed-bit baseline with
        budget, cfg = Budget(avg_weight_bits=8), TrainConfig(epochs=2, progress=False)
    else:
        budget = Budget(avg_weight_bits=4, max_act_bits=8)
        cfg = TrainConfig(epochs=2, track_slack=0.01, progress=False)
    trainer = DDQTrainer(model, budget, cfg, steps_per_epoch=max(steps, 1))
    trainer.calibrate([(x, y)], num_batches=1)
    ddq_opt = trainer.optimizer()
    model.train()

    def ddq_step() -> None:
        loss = trainer.loss(F.cross_entropy(model(x), y))
        ddq_opt.zero_grad(set_to_none=True)
        loss.backward()
        ddq_opt.step()
        trainer.step()

    return ddq_step


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    cases = ["fp32", "lsq_w4a4", "ddq_uniform", "ddq_adaptive"]
    if importlib.util.find_spec("brevitas") is not None:
        cases.insert(2, "brevitas_w4a4")
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    rows = []
    for arch in args.models:
        torch.manual_seed(args.seed)
        kw = {"width_mult": 0.25} if args.quick and arch == "mobilenet_v2" else {}
        fp = create_model(arch, num_classes=10, in_channels=1, small_input=True, **kw)
        n_steps = args.warmup + args.repeats
        steps = {c: _step_fn(c, fp, x, y, n_steps) for c in cases}
        times: dict[str, list[float]] = {c: [] for c in cases}
        rng = random.Random(args.seed)
        for rep in range(args.warmup + args.repeats):
            order = list(cases)
            rng.shuffle(order)
            for c in order:
                t0 = time.perf_counter()
                steps[c]()
                dt = time.perf_counter() - t0
                if rep >= args.warmup:
                    times[c].append(dt)
        med = {c: statistics.median(ts) for c, ts in times.items()}
        for c in cases:
            rows.append({"model": arch, "case": c, "ms": 1e3 * med[c],
                         "ratio_fp32": med[c] / med["fp32"],
                         "ratio_brevitas": (med[c] / med["brevitas_w4a4"]
                                            if "brevitas_w4a4" in med else None)})  # fmt: skip
        print(f"{arch}: " + ", ".join(f"{c} {1e3 * med[c]:.0f} ms" for c in cases), flush=True)
    return {
        "rows": rows,
        "torch": torch.__version__,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "machine": f"{platform.machine()} ({torch.get_num_threads()} thread(s) used)",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def render_markdown(report: dict) -> str:
    lines = [
        "# Training-step time: DDQ vs FP32, fixed-bit and brevitas QAT",
        "",
        f"torch {report['torch']}, {report['threads']} thread(s), batch {report['batch_size']}, "
        f"28x28 input, {report['date']}; median of {report['repeats']} interleaved repeats "
        f"after {report['warmup']} warm-up. Ratios are to the same run's fp32 (and brevitas) "
        "step.",
        "",
        "| model | case | step ms | ratio to fp32 | ratio to brevitas |",
        "|---|---|---:|---:|---:|",
    ]
    for r in report["rows"]:
        rb = "" if r["ratio_brevitas"] is None else f"{r['ratio_brevitas']:.2f}"
        lines.append(
            f"| {r['model']} | {r['case']} | {r['ms']:.1f} | {r['ratio_fp32']:.2f} | {rb} |"
        )
    lines += ["", "Command: `PYTHONPATH=src python benchmarks/bench_train_step.py`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny model, 1 repeat")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batch_size, args.repeats, args.warmup = ["mobilenet_v2"], 4, 1, 0
    report = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "train_step.json").write_text(json.dumps(report, indent=2) + "\n")
    md = render_markdown(report)
    (args.out_dir / "train_step.md").write_text(md)
    print(md)
    return report


if __name__ == "__main__":
    main()
