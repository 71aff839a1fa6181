"""Accuracy versus budget on the embedded MNIST-5k data: FP32, the fixed-bit peers (LSQ and
brevitas at their documented recipes), and DDQ mixed precision (adaptive and uniform, per
channel and per tensor) at the same model sizes; plus ablations. Writes JSON, markdown and
PNG; ``benchmarks/make_benchmarks_tables.py`` regenerates the tables from the cache alone.

Protocol (identical for every method):

- data: the 4,000 training digits of MNIST-5k (``--subset`` for fewer), the 1,000 test
  digits; training images translated by up to ``--augment`` pixels (default 2) in every
  stage, the same augmented stream for every method of a seed;
- FP32: one model per (architecture, seed), ``--fp-epochs`` (default 30) of SGD (lr
  ``--fp-lr`` 0.05, momentum 0.9, Nesterov, weight decay 5e-4), ``--fp-warmup`` (1) epoch
  of linear warm-up then cosine to 0, batch ``--batch-size`` (64);
- every quantized method starts from a copy of that FP32 model: it is first calibrated
  without training (the ``ptq`` column: the method's own post-training start on the same
  ``calib_batches`` batches, ending for every method with the BatchNorm statistics
  re-estimated on the quantized model: ddq's ``calibrate``, brevitas's
  ``norm_correction_mode``, ddq's ``reestimate_batchnorm`` for LSQ), then trained
  ``--qat-epochs`` (default 6) with the same data order, batch size and weight optimizer
  (SGD lr 0.01, momentum 0.9, weight decay 5e-5, cosine over all QAT steps; quantizer
  parameters without weight decay); before every QAT step the global gradient norm of
  everything the step updates (weights and quantizer parameters) is clipped to
  ``--grad-clip`` (default 10, ``none`` for off; ``TrainConfig.grad_clip`` for DDQ). At 10
  it never bound DDQ's steps in the probe (norms up to 8) and turned LSQ's W2A2 overflow
  on MobileNetV2 (gradient norms of 1e5 to Inf) into bounded steps
  (``benchmarks/results/accuracy_v3/probe.md``); ``--freeze-bn`` (off by default: it cost DDQ accuracy and rescued no peer
  there) keeps every method's BatchNorm on its running statistics in QAT steps;
- sizes count quantized weights at their bits and everything else at 32 bits; the first
  and last layer are at 8 bits for every method. DDQ's budget is the byte size of the
  fixed-bit model of the same bits (``W{b}A{b}``), with activations capped at ``b`` bits.

Methods (``METHODS``; recipes in ``lsq_baseline.py`` and ``brevitas_baseline.py``):

- ``lsq``: LSQ (Esser et al. 2020) as in the paper: per-tensor steps, ``s = 2 mean|v| /
  sqrt(Qp)`` from the weight and from the first batch, gradient scale ``1/sqrt(N Qp)``,
  steps trained by the weights' SGD. ``lsq-perchannel``: per-channel weight steps.
- ``brevitas``: brevitas's own low-bit recipe (brevitas_examples imagenet_classification
  ``CommonIntWeightPerChannelQuant`` + ``CommonIntActQuant``/``CommonUintActQuant``),
  calibrated as its ``ptq_common`` does (``calibration_mode``, ``norm_correction_mode``).
  ``brevitas-mse``: ``Int8WeightPerChannelFloatMSE`` + ``Int8/Uint8ActPerTensorFloatMSE``.
  ``brevitas-pertensor``: the recipe of versions 1-2.
- ``ddq-adaptive``, ``ddq-uniform``: learned bits, per-channel weights; ``-pertensor``:
  per-tensor weights. Post-training: calibrate, fit the bits to the budget from the gate
  logits and gradients (no training), calibrate again.
- ablations: ``ddq-adaptive-frozen`` (levels not learned), ``ddq-adaptive-noscale`` (no
  level-gradient scaling), ``ddq-adaptive-fixedbits`` / ``ddq-uniform-fixedbits`` (mixed
  precision off: every layer at the budget's bits).

Results are cached per run in ``runs.jsonl``, keyed on every setting, the ddq version and
the git commit, so an interrupted benchmark continues where it stopped (``--fresh``
starts over) and no result of other code or settings enters a table.

    python benchmarks/bench_accuracy.py --out-dir benchmarks/results/accuracy_v3   # hours
    python benchmarks/bench_accuracy.py --quick             # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ddq
from ddq.budget import Budget, CostModel
from ddq.conversion import calibrate, summary
from ddq.conversion.calibrate import reestimate_batchnorm
from ddq.data import create_dataset, make_loaders
from ddq.models import create_model
from ddq.training import DDQTrainer, TrainConfig, evaluate, train_ddq

METHODS = (
    "fp32",
    "lsq",
    "lsq-perchannel",
    "brevitas",
    "brevitas-mse",
    "brevitas-pertensor",
    "ddq-adaptive",
    "ddq-uniform",
    "ddq-adaptive-pertensor",
    "ddq-uniform-pertensor",
    "ddq-adaptive-frozen",
    "ddq-adaptive-noscale",
    "ddq-adaptive-fixedbits",
    "ddq-uniform-fixedbits",
)
# What the table says each method is (its recipe and where the recipe comes from).
RECIPE = {
    "fp32": "float reference",
    "lsq": "LSQ (Esser et al. 2020): per-tensor steps, 2 mean(abs(v))/sqrt(Qp) init, grad scale 1/sqrt(N Qp); PTQ: that init + BatchNorm re-estimation",
    "lsq-perchannel": "LSQ with per-channel weight steps",
    "brevitas": "brevitas_examples imagenet_classification: CommonIntWeightPerChannelQuant + CommonIntActQuant/CommonUintActQuant; PTQ calibration_mode + norm_correction_mode",
    "brevitas-mse": "brevitas.quant Int8WeightPerChannelFloatMSE + Int8ActPerTensorFloatMSE/Uint8ActPerTensorFloatMSE; PTQ calibration_mode + norm_correction_mode",
    "brevitas-pertensor": "brevitas.quant Int8WeightPerTensorFloat + Int8ActPerTensorFloat/Uint8ActPerTensorFloat (versions 1-2)",
    "ddq-adaptive": "DDQ, learned bits, adaptive levels, per-channel",
    "ddq-uniform": "DDQ, learned bits, uniform levels, per-channel",
    "ddq-adaptive-pertensor": "DDQ, learned bits, adaptive levels, per-tensor",
    "ddq-uniform-pertensor": "DDQ, learned bits, uniform levels, per-tensor",
    "ddq-adaptive-frozen": "ablation: DDQ adaptive, levels not learned (lr 0)",
    "ddq-adaptive-noscale": "ablation: DDQ adaptive, no level-gradient scaling",
    "ddq-adaptive-fixedbits": "ablation: DDQ adaptive, every layer at b bits (no mixed precision)",
    "ddq-uniform-fixedbits": "ablation: DDQ uniform, every layer at b bits (no mixed precision)",
}  # fmt: skip
FIXED_BIT_PEERS = ("lsq", "lsq-perchannel", "brevitas", "brevitas-mse", "brevitas-pertensor")
# The protocol's defaults of --grad-clip and --freeze-bn (probe.md, accuracy_v3).
GRAD_CLIP: float | None = 10.0
FREEZE_BN = False
CALIB_SEED = 999_983  # the loader seed of the calibration batches (an "epoch" never trained)


class ShiftedDigits(Dataset):
    """The training split with each image translated by up to ``pad`` pixels in x and y
    (the background, the split's minimum, fills the border): the standard MNIST
    augmentation. Draws from the global torch RNG, which every training loop here seeds
    per epoch, so the augmented stream is the same for every method of a seed."""

    def __init__(self, base: Dataset, pad: int) -> None:
        self.base, self.pad = base, pad
        self.fill = float(base.tensors[0].min()) if hasattr(base, "tensors") else 0.0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.base[i]
        if self.pad:
            p = self.pad
            dx, dy = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
            h, w = x.shape[-2:]
            x = F.pad(x, (p, p, p, p), value=self.fill)[..., dy : dy + h, dx : dx + w]
        return x, y


def _seed_epoch(loader, seed: int, epoch: int) -> None:
    """The data order and augmentation of one epoch, seeded as ``train_ddq`` seeds them."""
    torch.manual_seed(seed * 1_000_003 + epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(seed * 1_000_003 + epoch)


def train_fp32(model, train_loader, test_loader, epochs: int, lr: float, warmup: int,
               seed: int, max_steps: int | None = None, log=None) -> tuple[float, list[float]]:  # fmt: skip
    """The FP32 stage: SGD (momentum 0.9, Nesterov, weight decay 5e-4), ``warmup`` epochs
    of linear warm-up then cosine to 0, per step. Returns the final test accuracy and the
    test accuracy after every epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)  # fmt: skip
    per_epoch = min(len(train_loader), max_steps or 10**9)
    total, warm = max(epochs * per_epoch, 1), warmup * per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    history = []
    for epoch in range(epochs):
        _seed_epoch(train_loader, seed + 7919, epoch)
        model.train()
        for i, (x, y) in enumerate(train_loader):
            if i >= per_epoch:
                break
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        history.append(evaluate(model, test_loader))
        if log is not None:
            log(f"fp32 epoch {epoch + 1}/{epochs}: {history[-1]:.2f}%")
    return history[-1], history


def calibration_batches(train_loader, n: int, seed: int) -> list:
    """The ``n`` batches every method of a seed calibrates on: drawn exactly as
    ``train_ddq`` draws its own (global seed ``seed``, loader seed ``CALIB_SEED``)."""
    torch.manual_seed(seed)
    train_loader.generator.manual_seed(CALIB_SEED)
    out = []
    for i, batch in enumerate(train_loader):
        if i >= n:
            break
        out.append(batch)
    return out


def freeze_batchnorm(model: torch.nn.Module) -> int:
    """Keep every BatchNorm of ``model`` on its running statistics in training steps:
    a BatchNorm in training mode normalises by its running mean and variance (and does
    not update them) in any forward pass that records gradients. Passes without
    gradients (calibration, BatchNorm re-estimation, evaluation) are unchanged, so the
    hooks can be installed before ``train_ddq``, which calibrates first. The same hooks
    serve every method (``--freeze-bn``). Returns the number of BatchNorm modules."""

    def before(bn, _inputs):
        if bn.training and torch.is_grad_enabled():
            bn.training = False
            bn._ddq_frozen_in_training = True  # restored after this forward pass

    def after(bn, _inputs, _output):
        if getattr(bn, "_ddq_frozen_in_training", False):
            bn.training, bn._ddq_frozen_in_training = True, False

    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(before)
            m.register_forward_hook(after)
            n += 1
    return n


def train_fixed(model, train_loader, epochs: int, lr: float, weight_decay: float, seed: int,
                max_steps: int | None, grad_clip: float | None = None) -> None:  # fmt: skip
    """QAT of a fixed-bit peer (LSQ, brevitas): the weight schedule of ``train_ddq`` (SGD,
    momentum 0.9, cosine over all steps, the same per-epoch data order); the quantizer's
    own parameters (LSQ steps, brevitas scales) share the SGD, without weight decay.
    ``grad_clip``: the global gradient norm of all trained parameters is clipped to it
    before every step, as ``TrainConfig.grad_clip`` does for DDQ.
    ``FloatingPointError`` if the loss stops being finite."""
    quant = [p for n, p in model.named_parameters() if "quant" in n]
    ids = {id(p) for p in quant}
    weights = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.SGD([{"params": weights, "weight_decay": weight_decay},
                           {"params": quant, "weight_decay": 0.0}], lr=lr, momentum=0.9)  # fmt: skip
    per_epoch = min(len(train_loader), max_steps or 10**9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs * per_epoch, 1))
    for epoch in range(epochs):
        _seed_epoch(train_loader, seed, epoch)
        model.train()
        for i, (x, y) in enumerate(train_loader):
            if i >= per_epoch:
                break
            loss = F.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss in epoch {epoch + 1}, step {i + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.grad is not None], grad_clip
                )
            opt.step()
            sched.step()


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


def _diverged(method: str, bits: int, seed: int, err: Exception, t0: float, size: float,
              ptq_acc: float | None) -> dict:  # fmt: skip
    """A run whose training diverged: scored at chance, and said so."""
    print(f"{method} {bits}-bit seed {seed} diverged: {err}", flush=True)
    return {"acc": 10.0, "ptq_acc": ptq_acc, "diverged": True, "size_bytes": size,
            "gbitops": float("nan"), "avg_w_bits": float("nan"), "wall_s": time.time() - t0}  # fmt: skip


def run_one(method: str, bits: int, fp_model, loaders, example, args, seed: int) -> dict:
    """Calibrate (post-training) then train one quantized model from a copy of
    ``fp_model``; return its measurements."""
    train_loader, test_loader = loaders
    # Callers that build ``args`` themselves (tests, probes) get the protocol's defaults.
    grad_clip = getattr(args, "grad_clip", GRAD_CLIP)
    freeze_bn = getattr(args, "freeze_bn", FREEZE_BN)
    model = copy.deepcopy(fp_model)
    calib = calibration_batches(train_loader, args.calib_batches, seed)
    tcfg = TrainConfig(epochs=args.qat_epochs, seed=seed, progress=False,
                       max_steps_per_epoch=args.max_steps,
                       lr_gates=args.lr_gates, track_slack=args.track_slack,
                       calib_batches=args.calib_batches,
                       fit_batches=args.calib_batches, grad_clip=grad_clip)  # fmt: skip
    t0 = time.time()
    extra: dict = {}
    # Every fixed-bit model (first/last at 8 bits) has the size of ddq's fixed-bit model.
    ref = ddq.prepare(copy.deepcopy(fp_model), _qcfg("uniform", bits, 1), example_inputs=example)
    target = CostModel(ref).size_bytes()  # the W{b}A{b} fixed-bit model's size
    if method in FIXED_BIT_PEERS:
        if method.startswith("lsq"):
            from lsq_baseline import lsq_quantize

            lsq_quantize(model, bits, example, per_channel=method == "lsq-perchannel")
            # LSQ's start: input steps from the first batch (eval mode); then the
            # BatchNorm statistics re-estimated on the quantized model, as every method's
            # post-training start does (ddq's calibrate, brevitas's norm_correction_mode).
            model.eval()
            with torch.no_grad():
                model(calib[0][0])
                reestimate_batchnorm(model, calib, len(calib))
        else:
            from brevitas_baseline import brevitas_calibrate, brevitas_quantize

            recipe = {"brevitas": "perchannel", "brevitas-mse": "mse"}.get(method, "pertensor")
            brevitas_quantize(model, bits, example, recipe=recipe)
            brevitas_calibrate(model, calib)
        ptq_acc = evaluate(model, test_loader)
        if freeze_bn:
            freeze_batchnorm(model)
        try:
            train_fixed(model, train_loader, args.qat_epochs, tcfg.lr, tcfg.weight_decay, seed,
                        args.max_steps, grad_clip=tcfg.grad_clip)  # fmt: skip
        except FloatingPointError as e:
            return _diverged(method, bits, seed, e, t0, target, ptq_acc)
        acc = evaluate(model, test_loader)
        size, gbitops, avg = _size_and_bitops(ref)
    else:  # the ddq methods
        mode = "uniform" if method.startswith("ddq-uniform") else "adaptive"
        per_channel = not method.endswith("-pertensor")
        if method == "ddq-adaptive-frozen":  # levels stay at their data-driven fit
            tcfg = dataclasses.replace(tcfg, lr_levels=0.0)
        if method.endswith("-fixedbits"):  # mixed precision off: every layer at b bits
            budget = Budget(avg_weight_bits=8)  # met by construction; bits are frozen
            ddq.prepare(model, _qcfg(mode, bits, 1), example_inputs=example)
        else:
            budget = Budget(size_bytes=target, max_act_bits=bits)
            # Weights learn 2..8 bits (ddq's default floor); at the 2-bit size the adaptive
            # floor is 1, or every layer would be pinned at 2 with nothing left to allocate.
            # Uniform keeps 2: a signed 1-bit integer grid is {-S, 0}, with no positive
            # level (its layers at 1 bit left ddq-uniform at chance in version 2).
            floor = 2 if bits > 2 or mode == "uniform" else 1
            ddq.prepare(model, _qcfg(mode, None, floor, grad_scale=method != "ddq-adaptive-noscale",
                                     per_channel=per_channel),
                        example_inputs=example)  # fmt: skip
        # Post-training: calibrate; fit the bits to the budget from the gate logits and the
        # gate gradients of a few batches (no weight update); calibrate at those bits.
        ptq = copy.deepcopy(model)
        trainer = DDQTrainer(ptq, budget, tcfg, steps_per_epoch=1)
        trainer.calibrate(calib)
        trainer.finalize(calib, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
        calibrate(ptq, calib, len(calib), method=tcfg.calib_method)
        ptq_acc = evaluate(ptq, test_loader)
        del ptq, trainer
        train_loader.generator.manual_seed(CALIB_SEED)  # train_ddq calibrates on `calib`
        if freeze_bn:  # after the copy above; train_ddq's calibration is unaffected
            freeze_batchnorm(model)
        try:
            res = train_ddq(model, train_loader, test_loader, budget, tcfg)
        except FloatingPointError as e:
            return _diverged(method, bits, seed, e, t0, target, ptq_acc)
        acc = res.test_acc
        size, gbitops, avg = _size_and_bitops(model)
        extra["budget_bytes"] = target
        extra["bits_moved_by_fit"] = len(res.fit_actions)
        extra["layers"] = [
            {k: r[k] for k in ("name", "kind", "w_bits", "a_bits", "params")}
            for r in summary(model)
        ]
    return {"acc": acc, "ptq_acc": ptq_acc, "size_bytes": size, "gbitops": gbitops,
            "avg_w_bits": avg, "wall_s": time.time() - t0, **extra}  # fmt: skip


def code_version() -> str:
    """The ddq version and git commit the runs come from (``+dirty`` for uncommitted or
    untracked files under src/ or benchmarks/ outside benchmarks/results/), so a table
    never mixes results of different code."""
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
            # results/ is excluded: a run writing its cache must not change the version
            # the next process of the same benchmark computes.
            ["git", "status", "--porcelain", "--", "src", "benchmarks", ":!benchmarks/results"],
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
        if (m, b) not in plan:
            plan.append((m, b))
    return plan


SETTINGS = ("subset", "fp_epochs", "fp_lr", "fp_warmup", "augment", "qat_epochs", "max_steps",
            "batch_size", "calib_batches", "width_mult", "lr_gates", "track_slack", "grad_clip",
            "freeze_bn")  # fmt: skip


def settings_of(args) -> dict:
    """Everything a run's result depends on besides (model, seed, method, bits)."""
    s = {k: getattr(args, k) for k in SETTINGS}
    s["code"] = args.code or code_version()
    return s


def _optional_positive(text: str) -> float | None:
    """``--grad-clip``'s value: a finite number > 0, or 'none'."""
    if text.lower() == "none":
        return None
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0 or 'none', got {text!r}")
    return v


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["mobilenet_v2", "small_cnn", "resnet18"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    p.add_argument("--lsq-bits", nargs="*", type=int, default=[],
                   help="extra bitwidths run by the lsq baseline only (e.g. 8: W8A8)")  # fmt: skip
    p.add_argument("--methods", nargs="+", choices=METHODS,
                   default=["fp32", "lsq", "lsq-perchannel", "brevitas", "brevitas-mse",
                            "ddq-adaptive", "ddq-uniform", "ddq-adaptive-pertensor",
                            "ddq-uniform-pertensor"])  # fmt: skip
    p.add_argument("--ablation", dest="ablations", nargs=2, action="append",
                   metavar=("METHOD", "BITS"), default=None,
                   help="extra runs, e.g. --ablation ddq-adaptive-noscale 3 (default: the "
                        "four ablations at 3 bits; --no-ablations for none)")  # fmt: skip
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--subset", type=int, default=None, help="training examples (default all)")
    p.add_argument("--augment", type=int, default=2, help="random translation, pixels (0: off)")
    p.add_argument("--fp-epochs", type=int, default=30)
    p.add_argument("--fp-lr", type=float, default=0.05)
    p.add_argument("--fp-warmup", type=int, default=1, help="FP32 warm-up epochs before cosine")
    p.add_argument("--qat-epochs", type=int, default=6)
    p.add_argument("--max-steps", type=int, default=None, help="steps per epoch cap")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--calib-batches", type=int, default=8,
                   help="batches of post-training calibration (every method)")  # fmt: skip
    p.add_argument("--lr-gates", type=float, default=TrainConfig.lr_gates,
                   help="gate learning rate (raise it for short schedules)")  # fmt: skip
    p.add_argument("--track-slack", type=lambda v: None if v == "none" else float(v),
                   default=TrainConfig.track_slack,
                   help="budget tracker slack for DDQ ('none': multiplier only)")  # fmt: skip
    p.add_argument("--grad-clip", type=_optional_positive, default=GRAD_CLIP,
                   help="global gradient-norm clip before every QAT step, every method "
                        "('none': off)")  # fmt: skip
    p.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=FREEZE_BN,
                   help="BatchNorm on its running statistics during QAT, every method")  # fmt: skip
    p.add_argument("--width-mult", type=float, default=1.0, help="mobilenet_v2 width")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: run seeds or models as parallel processes; "
                        "several threads on a loaded machine are many times slower)")  # fmt: skip
    p.add_argument("--out-dir", default="benchmarks/results/accuracy_v3")
    p.add_argument("--fresh", action="store_true", help="ignore cached runs")
    p.add_argument("--code", default=None,
                   help="code version whose cached runs to use (default: this checkout's)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smoke test: tiny everything")
    p.add_argument("--report-only", action="store_true",
                   help="write the tables and plots from the cached runs; train nothing")  # fmt: skip
    args = p.parse_args(argv)
    if args.ablations is None:
        args.ablations = [] if args.quick or args.no_ablations else [
            (m, 3) for m in ("ddq-adaptive-frozen", "ddq-adaptive-noscale",
                             "ddq-adaptive-fixedbits", "ddq-uniform-fixedbits")]  # fmt: skip
    args.ablations = [(m, int(b)) for m, b in args.ablations]
    bad = sorted({m for m, _ in args.ablations} - set(METHODS))
    if bad:
        p.error(f"unknown ablation method(s) {bad}; known: {list(METHODS)}")
    if args.quick:
        args.models, args.seeds, args.bits, args.lsq_bits = ["mobilenet_v2"], [0], [4], []
        args.subset, args.fp_epochs, args.qat_epochs, args.max_steps = 64, 1, 1, 1
        args.batch_size, args.calib_batches, args.width_mult = 32, 1, 0.25
    return args


def load_cache(path: Path) -> dict[str, dict]:
    """The cached runs of ``runs.jsonl`` by key (a later line replaces an earlier one)."""
    cache: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                cache[rec["key"]] = rec
    return cache


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    command = shlex.join(["python", "benchmarks/bench_accuracy.py", *argv])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "runs.jsonl"
    if args.fresh:
        cache_path.unlink(missing_ok=True)
    cache = load_cache(cache_path)
    settings = settings_of(args)
    torch.set_num_threads(args.threads)
    splits = create_dataset("mnist5k", subset=args.subset)
    if args.augment:
        splits = dataclasses.replace(splits, train=ShiftedDigits(splits.train, args.augment))
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "brevitas": _brevitas_version()}  # fmt: skip

    def record(rec: dict) -> None:
        rec |= {"command": command, "env": env, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        cache[rec["key"]] = rec
        with cache_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

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
                acc, history = train_fp32(
                    fp_model, *loaders, epochs=args.fp_epochs, lr=args.fp_lr,
                    warmup=args.fp_warmup, seed=seed, max_steps=args.max_steps,
                    log=lambda msg, a=arch, s=seed: print(f"{a} seed {s} {msg}", flush=True),
                )  # fmt: skip
                torch.save(fp_model.state_dict(), fp_state_path)
                ref = ddq.prepare(copy.deepcopy(fp_model), example_inputs=example)
                cm = CostModel(ref)
                record({"key": fp_key, "arch": arch, "seed": seed, "method": "fp32", "bits": 32,
                        "acc": acc, "ptq_acc": None, "fp32_history": history,
                        "size_bytes": cm.fp32_bytes(), "gbitops": cm.fp32_gbitops(),
                        "avg_w_bits": 32.0, "wall_s": time.time() - t0})  # fmt: skip
                print(f"{arch} seed {seed} fp32: {acc:.2f}%", flush=True)
            for method, bits in _plan(args):
                key = f"{base_key}|{method}|{bits}"
                if key in cache:
                    continue
                r = run_one(method, bits, fp_model, loaders, example, args, seed)
                record(
                    {"key": key, "arch": arch, "seed": seed, "method": method, "bits": bits, **r}
                )
                ptq = "" if r["ptq_acc"] is None else f"ptq {r['ptq_acc']:.2f}% -> "
                print(f"{arch} seed {seed} {method} {bits}-bit: {ptq}{r['acc']:.2f}% "
                      f"({r['size_bytes'] / 1e3:.1f} kB, {r['wall_s']:.0f} s)", flush=True)  # fmt: skip
    records = select(cache.values(), args.models, args.seeds, settings)
    write_outputs(records, out, args)
    return 0


def _brevitas_version() -> str | None:
    try:
        import brevitas
    except ImportError:
        return None
    return brevitas.__version__


def select(records, models, seeds, settings: dict) -> list[dict]:
    """The cached runs of ``models`` and ``seeds`` under exactly ``settings``."""
    return [
        r for r in records
        if r["arch"] in models and r["seed"] in seeds
        and r["key"].split("|")[0] == _base_key(r["arch"], r["seed"], settings)
    ]  # fmt: skip


def _mean_finite(values) -> float:
    """Mean over the runs that have the value (a diverged run has no final size or bits)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.mean(finite) if finite else float("nan")


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["arch"], r["method"], r["bits"]), []).append(r)
    rows = []
    order = {m: i for i, m in enumerate(METHODS)}
    for (arch, method, bits), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], -kv[0][2], order.get(kv[0][1], 99))
    ):
        rs = sorted(rs, key=lambda r: r["seed"])
        accs = [r["acc"] for r in rs]
        ptqs = [r["ptq_acc"] for r in rs if r.get("ptq_acc") is not None]
        rows.append({
            "arch": arch, "method": method, "bits": bits, "n_seeds": len(rs),
            "per_seed": {r["seed"]: r["acc"] for r in rs},
            "diverged": [r["seed"] for r in rs if r.get("diverged")],
            "acc_mean": statistics.mean(accs), "acc_std": _std(accs),
            "ptq_mean": statistics.mean(ptqs) if ptqs else None,
            "ptq_std": _std(ptqs) if ptqs else None,
            "size_bytes": _mean_finite(r["size_bytes"] for r in rs),
            "gbitops": _mean_finite(r["gbitops"] for r in rs),
            "avg_w_bits": _mean_finite(r["avg_w_bits"] for r in rs),
            "wall_s": statistics.mean(r["wall_s"] for r in rs),
        })  # fmt: skip
    return rows


DDQ_MODES = ("ddq-adaptive", "ddq-uniform", "ddq-adaptive-pertensor", "ddq-uniform-pertensor")


def goal_table(rows: list[dict]) -> list[str]:
    """The issue's goals: DDQ at the 4-bit size within 0.3 pt of FP32; at smaller sizes at
    least 1 pt above the best fixed-bit peer (any LSQ or brevitas recipe). DDQ is the best
    of its modes (adaptive/uniform, per channel/per tensor). Means are taken over the
    seeds that every compared method has run, so the comparison is paired."""
    by = {(r["arch"], r["method"], r["bits"]): r for r in rows}
    lines = ["Goals (means over the seeds all compared methods share):", "",
             "| model | size of | seeds | FP32 | best fixed-bit peer | best DDQ | "
             "DDQ - best fixed | DDQ - FP32 | goal | met |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for arch in sorted({r["arch"] for r in rows}):
        for bits in sorted({r["bits"] for r in rows if r["arch"] == arch and r["bits"] < 8},
                           reverse=True):  # fmt: skip
            methods = ["fp32", *FIXED_BIT_PEERS, *DDQ_MODES]
            got = {m: by[(arch, m, 32 if m == "fp32" else bits)]["per_seed"] for m in methods
                   if (arch, m, 32 if m == "fp32" else bits) in by}  # fmt: skip
            fixed = [m for m in FIXED_BIT_PEERS if m in got]
            ddqs = [m for m in DDQ_MODES if m in got]
            if "fp32" not in got or not fixed or not ddqs:
                continue
            seeds = sorted(set.intersection(*(set(v) for v in got.values())))
            if not seeds:
                continue
            mean = {m: statistics.mean(got[m][s] for s in seeds) for m in got}
            best = max(fixed, key=lambda m: mean[m])
            top = max(ddqs, key=lambda m: mean[m])
            d_fixed, d_fp = mean[top] - mean[best], mean[top] - mean["fp32"]
            d_fixed, d_fp = round(d_fixed, 2), round(d_fp, 2)  # as printed, not float noise
            goal, met = (("within 0.3 of FP32", d_fp >= -0.3) if bits >= 4
                         else (">= 1 above best fixed", d_fixed >= 1.0))  # fmt: skip
            lines.append(f"| {arch} | W{bits}A{bits} | {','.join(map(str, seeds))} | "
                         f"{mean['fp32']:.2f} | {mean[best]:.2f} ({best}) | "
                         f"{mean[top]:.2f} ({top}) | {d_fixed:+.2f} | {d_fp:+.2f} | {goal} | "
                         f"{'yes' if met else 'no'} |")  # fmt: skip
    return lines


def accuracy_table(rows: list[dict]) -> list[str]:
    """One line per (model, bits, method): post-training and trained top-1, seeds, size."""
    md = ["| model | size of | method | seeds | post-training top-1 (%) | trained top-1 (%) "
          "mean ± std | per seed | size (kB) | GBitOps | avg W bits |",
          "|---|---|---|---|---:|---:|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        per_seed = " / ".join(f"{a:.1f}" + ("*" if s in r["diverged"] else "")
                              for s, a in r["per_seed"].items())  # fmt: skip
        size = "FP32" if r["method"] == "fp32" else f"W{r['bits']}A{r['bits']}"
        ptq = "" if r["ptq_mean"] is None else f"{r['ptq_mean']:.2f} ± {r['ptq_std']:.2f}"
        md.append(f"| {r['arch']} | {size} | {r['method']} | {r['n_seeds']} | {ptq} | "
                  f"{r['acc_mean']:.2f} ± {r['acc_std']:.2f} | {per_seed} | "
                  f"{r['size_bytes'] / 1e3:.1f} | {r['gbitops']:.3f} | {r['avg_w_bits']:.2f} |")  # fmt: skip
    if any(r["diverged"] for r in rows):
        md += ["", "\\* training diverged (NaN or Inf): scored at chance, 10%."]
    return md


def recipe_table(rows: list[dict]) -> list[str]:
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    return ["| method | recipe |", "|---|---|", *(f"| {m} | {RECIPE[m]} |" for m in methods)]


def markdown(records: list[dict]) -> list[str]:
    """The accuracy tables of ``records`` (one code version and settings), with the
    commands that produced them."""
    rows = aggregate(records)
    commands = sorted({r.get("command", "(not recorded)") for r in records})
    codes = sorted({json.loads(r["key"].split("|")[0])["code"] for r in records})
    md = [f"Code: {', '.join(codes)}. Produced by:", "", "```bash", *commands, "```", ""]
    md += [*accuracy_table(rows), "", *goal_table(rows), "", *recipe_table(rows)]
    return md + start_note(records)


def start_note(records: list[dict]) -> list[str]:
    """A note naming the runs that started from an earlier FP32 model than the one the
    table shows for their seed (empty when there are none).

    A seed's FP32 model is retrained when its saved weights are gone (a new machine), and
    a retrain need not give the same weights (float kernels differ across CPUs); the
    cache then keeps the runs of the old model beside the new FP32 record. Every run
    finishes after the FP32 training it started from, so a run that finished before its
    seed's FP32 record did came from an earlier model.
    """
    fp = {(r["arch"], r["seed"]): r.get("finished") for r in records if r["method"] == "fp32"}
    earlier: dict[tuple, list[str]] = {}
    for r in records:
        done, fp_done = r.get("finished"), fp.get((r["arch"], r["seed"]))
        if r["method"] != "fp32" and done and fp_done and done < fp_done:
            earlier.setdefault((r["arch"], r["seed"]), []).append(f"{r['method']} {r['bits']}")
    if not earlier:
        return []
    lines = ["", "Runs that started from an earlier FP32 model of their seed (it was retrained "
             "since, and the FP32 row shows the retrained one):", ""]  # fmt: skip
    for (arch, seed), runs in sorted(earlier.items()):
        lines.append(f"- {arch} seed {seed}: {', '.join(sorted(runs))}")
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
    md = markdown(records)
    (out / "accuracy.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    _plots(rows, records, out)


def _plots(rows: list[dict], records: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    archs = sorted({r["arch"] for r in rows})
    palette = plt.get_cmap("tab20")
    order = {m: i for i, m in enumerate(METHODS)}
    for xkey, xlabel, fname in (("size_bytes", "model size (kB)", "pareto_size.png"),
                                ("gbitops", "GBitOps", "pareto_bitops.png")):  # fmt: skip
        fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4), squeeze=False)
        for ax, arch in zip(axes[0], archs, strict=True):
            for method in sorted({r["method"] for r in rows if r["arch"] == arch}):
                rs = sorted((r for r in rows if r["arch"] == arch and r["method"] == method),
                            key=lambda r: r[xkey])  # fmt: skip
                xs = [r[xkey] / (1e3 if xkey == "size_bytes" else 1) for r in rs]
                # One colour per method across plots (tab10 repeats after 10 methods) and
                # a line style per family, so peers and DDQ variants stay apart.
                ddq_family = method.startswith("ddq")
                ax.errorbar(xs, [r["acc_mean"] for r in rs], yerr=[r["acc_std"] for r in rs],
                            color=palette(order.get(method, 0) % 20), capsize=3, label=method,
                            marker="o" if ddq_family else "*" if method == "fp32" else "s",
                            linestyle="-" if ddq_family else "--")  # fmt: skip
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
