"""``ddq quantize``: the main job."""

from __future__ import annotations

import argparse
from typing import Any

from ..conversion import DDQConfig
from ..conversion.presets import PRESETS, apply_preset
from ..jobs.run import RunConfig, run_quantize
from .config_file import read_settings

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "quantize",
        help="train a model to a budget with DDQ (the main job)",
        description="[FP32 pre-training if no --weights] -> calibrate -> DDQ training to the "
        "budget -> report -> checkpoint. Settings come from defaults, then --config, then flags.",
    )
    p.add_argument("--config", help="YAML/JSON file of settings (RunConfig fields)")
    p.add_argument("--model", help="registered model (see `ddq list`); default mobilenet_v2")
    p.add_argument("--width-mult", type=float, help="mobilenet_v2 width multiplier")
    p.add_argument("--dataset", help="registered dataset; default mnist5k (embedded)")
    p.add_argument("--data-root", help="folder of an on-disk dataset (cifar10, imagefolder)")
    p.add_argument("--subset", type=int, help="use only this many training examples")
    p.add_argument("--weights", help="float weights to start from (.safetensors or .pt)")
    p.add_argument("--out", help="run folder; default runs/default")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    b = p.add_argument_group("budget (exactly one target)")
    b.add_argument("--avg-bits", type=float, help="average weight bits (4 = uniform 4-bit size)")
    b.add_argument("--size-bytes", type=float, help="model size in bytes")
    b.add_argument("--size-ratio", type=float, help="model size as a fraction of FP32")
    b.add_argument("--gbitops", type=float, help="BitOps in units of 1e9")
    b.add_argument("--max-act-bits", type=int, help="cap on activation bits (0 = no cap)")
    q = p.add_argument_group("quantizers")
    q.add_argument("--mode", choices=["adaptive", "uniform"],
                   help="levels of weights and activations (default adaptive)")  # fmt: skip
    q.add_argument("--preset", choices=sorted(PRESETS),
                   help="level families: adaptive (both), int8 (adaptive weights, uniform "
                        "activations: ONNX at int8 speed) or uniform (both)")  # fmt: skip
    q.add_argument("--max-bits", type=int, help="largest bitwidth K (default 8)")
    q.add_argument("--min-bits", type=int, help="bitwidth floor (default 2)")
    q.add_argument("--first-last", help="first/last layer: bits (default 8), 'learn' or 'float'")
    q.add_argument("--per-tensor", action="store_true",
                   help="one weight range per layer instead of one scale per output channel")  # fmt: skip
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, help="DDQ epochs (default 6)")
    t.add_argument("--fp-epochs", type=int, help="FP32 pre-training epochs without --weights")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float, help="weight learning rate (SGD)")
    t.add_argument("--lr-levels", type=float)
    t.add_argument("--lr-gates", type=float)
    t.add_argument("--freeze-epochs", type=int, help="final epochs at fixed bits")
    t.add_argument("--max-steps-per-epoch", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="cpu or cuda[:N]")
    t.add_argument("--workers", type=int, help="data loader workers")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults, then the config file, then explicit flags."""
    d = RunConfig().to_dict()
    if args.config:
        file_settings = read_settings(args.config)
        for key in ("ddq", "train"):  # merged into the defaults; a file's budget replaces
            if key in file_settings:
                file_settings[key] = {**d[key], **file_settings[key]}
        d.update(file_settings)
    flat = {
        "model": args.model, "dataset": args.dataset, "data_root": args.data_root,
        "subset": args.subset, "weights": args.weights, "out": args.out, "seed": args.seed,
        "device": args.device, "workers": args.workers, "batch_size": args.batch_size,
        "fp_epochs": args.fp_epochs,
    }  # fmt: skip
    d.update({k: v for k, v in flat.items() if v is not None})
    if args.width_mult is not None:
        d["model_kwargs"] = {**d["model_kwargs"], "width_mult": args.width_mult}
    targets = {"avg_weight_bits": args.avg_bits, "size_bytes": args.size_bytes,
               "size_ratio": args.size_ratio, "gbitops": args.gbitops}  # fmt: skip
    given = {k: v for k, v in targets.items() if v is not None}
    if given:
        d["budget"] = {**given, "max_act_bits": d["budget"].get("max_act_bits")}
    if args.max_act_bits is not None:
        d["budget"] = {**d["budget"], "max_act_bits": args.max_act_bits or None}
    d["budget"] = {k: v for k, v in d["budget"].items() if v is not None}
    ddq = dict(d["ddq"])
    if args.preset is not None:
        if args.mode is not None:
            raise ValueError("give --preset or --mode, not both")
        ddq = apply_preset(DDQConfig.from_dict(ddq), args.preset).to_dict()
    for key, val in (("mode", args.mode), ("max_bits", args.max_bits), ("min_bits", args.min_bits)):
        if val is not None:
            ddq["weight"] = {**ddq["weight"], key: val}
            if ddq.get("activation") is not None:
                ddq["activation"] = {**ddq["activation"], key: val}
    if args.per_tensor:
        ddq["weight"] = {**ddq["weight"], "per_channel": False}
    if args.first_last is not None:
        fl = args.first_last
        ddq["first_last_bits"] = int(fl) if fl.isdigit() else fl
    d["ddq"] = ddq
    train = dict(d["train"])
    for key in ("epochs", "lr", "lr_levels", "lr_gates", "freeze_epochs", "max_steps_per_epoch",
                "seed"):  # fmt: skip
        val = getattr(args, key)
        if val is not None:
            train[key] = val
    if args.no_progress:
        train["progress"] = False
    d["train"] = train
    return RunConfig.from_dict(d)


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    cfg = settings_from_args(args)
    res = run_quantize(cfg, resume=args.resume)
    if dist.is_initialized():  # under torchrun: one summary, then leave the group cleanly
        rank = dist.get_rank()
        dist.barrier()
        dist.destroy_process_group()
        if rank != 0:
            return 0
    print(
        f"\n{res['model']} on {res['dataset']}: FP32 {res['fp_acc']:.2f}% -> DDQ "
        f"{res['ddq_acc']:.2f}% at {res['budget_description']} "
        f"(usage {100 * res['budget_usage']:.2f}%), {res['wall_s']:.0f} s\n"
        f"report: {cfg.out}/report.md"
    )
    return 0
