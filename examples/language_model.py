"""A byte-level causal language model quantized with DDQ from a training loop of your own.

Not image classification, end to end, through the lifecycle API (``ddq.DDQTrainer``):

1. train ``TinyLM`` (``ddq.models.tiny_lm``: attention and MLP blocks whose every matrix
   product is an ``nn.Linear``) in FP32 on bytes of the Python standard library's own
   source files (``ddq.data.stdlib_text``; nothing is downloaded);
2. for each budget (average weight bits 4 and 3), quantize a copy with DDQ in a loop
   written here: ``ddq.prepare``, ``trainer.calibrate``, ``trainer.loss`` (task loss +
   budget term) per step, ``trainer.step()``, ``trainer.finalize()`` with the next-byte
   loss ranking the bits, a last phase at frozen bits;
3. measure validation perplexity (held-out stdlib modules), export each model with
   ``ddq.export`` and check that ``ddq.load`` reproduces its logits exactly;
4. write ``results/language_model.json`` and ``.md`` (figures, bits per layer, the loss
   curves, the Python version and SHA-256 of the text trained on).

Activations: every activation quantizer ``ddq.prepare`` places (the input of every
``nn.Linear``, and any output quantizer of the integer graph) is fixed at 8 bits on a
uniform grid, signedness from calibration. Embeddings, LayerNorms, biases and the two products
inside attention stay float (docs in ``ddq/models/tiny_lm.py``).

Run (27 minutes on the project's shared 2-core machine at a load average of about 8, about
a third of it FP32 training; ``--quick`` for a one-minute smoke run; ``ddq.export`` needs
``safetensors``, in the ``cli`` extra)::

    python examples/language_model.py
    python examples/language_model.py --fp32-from runs/language_model/fp32.pt  # reuse FP32

The FP32 weights and the artifacts go to ``runs/language_model/`` (git-ignored); only
the small JSON and markdown results go to ``examples/results/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ddq
from ddq.data.stdlib_text import StdlibText, load_stdlib_text, random_windows, sequential_windows
from ddq.models.tiny_lm import TinyLM
from ddq.training import split_parameters

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class LMConfig:
    """Every setting of the run (recorded in the results).

    The defaults are the full run; :func:`quick_config` and the test use tiny ones.
    """

    # model
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 64
    # FP32 training: AdamW, linear warm-up then cosine to ``fp32_min_lr_frac`` of the peak
    batch_size: int = 16
    fp32_steps: int = 450
    fp32_lr: float = 3e-3
    fp32_warmup: int = 30
    fp32_min_lr_frac: float = 0.05
    # DDQ: epochs of ``ddq_steps_per_epoch`` random batches; the last ``freeze_epochs`` at
    # fixed bits (after ``trainer.finalize``)
    budgets: tuple[float, ...] = (4.0, 3.0)
    act_bits: int = 8
    ddq_epochs: int = 3
    ddq_steps_per_epoch: int = 30
    freeze_epochs: int = 1
    ddq_lr: float = 3e-4  # AdamW on the weights, cosine to 0 over all DDQ steps
    lr_levels: float = 1e-3  # Adam on the levels (TrainConfig's default)
    # Adam on the gate logits: 3x TrainConfig's default for a learning phase of only 60
    # steps. At 0.01 (Adam moves a logit ~0.01 per step; a bit starts 0.25-1.5 above
    # closing) the gates reached 6.2 average bits by the fit at both budgets and the fit
    # closed the rest (28 bits for 4, 39 for 3).
    lr_gates: float = 3e-2
    calib_batches: int = 4
    fit_batches: int = 4
    # evaluation and logging
    eval_batch: int = 64
    eval_windows: int | None = None  # None: the whole validation text
    curve_every: int = 20
    seed: int = 0
    threads: int | None = None

    def model(self) -> TinyLM:
        return TinyLM(
            vocab_size=256,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            seq_len=self.seq_len,
        )


def quick_config() -> LMConfig:
    """A tiny configuration of the same code path (seconds; the smoke test uses it)."""
    return LMConfig(
        d_model=32,
        n_layers=2,
        n_heads=2,
        seq_len=32,
        batch_size=16,
        fp32_steps=60,
        fp32_warmup=5,
        ddq_epochs=2,
        ddq_steps_per_epoch=6,
        calib_batches=2,
        fit_batches=2,
        eval_windows=32,
        curve_every=10,
        # The 8-bit first/last layers are a large part of so small a model: at 3 bits on
        # average the rest would need less than its 2-bit floor.
        budgets=(4.0,),
    )


def next_byte_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of the next byte: the task loss, also ``finalize``'s ranking loss."""
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def batches(text: torch.Tensor, cfg: LMConfig, generator: torch.Generator) -> Iterator[Batch]:
    """An endless stream of random training windows."""
    while True:
        yield random_windows(text, cfg.seq_len, cfg.batch_size, generator)


@torch.no_grad()
def evaluate(model: nn.Module, tokens: torch.Tensor, cfg: LMConfig) -> dict[str, float]:
    """Validation loss (nats per byte), bits per byte and perplexity over the held-out text."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in sequential_windows(tokens, cfg.seq_len, cfg.eval_batch, cfg.eval_windows):
        logits = model(x)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was)
    loss = total / count
    return {"loss": loss, "bits_per_byte": loss / math.log(2), "ppl": math.exp(loss)}


def _cosine(step: int, total: int, warmup: int, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def train_fp32(
    model: TinyLM, text: StdlibText, cfg: LMConfig, log: Callable[[str], None]
) -> dict[str, Any]:
    """Train the float model; returns its loss curve (mean train loss per ``curve_every``)."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
        lr=cfg.fp32_lr,
        betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _cosine(s, cfg.fp32_steps, cfg.fp32_warmup, cfg.fp32_min_lr_frac)
    )
    model.train()
    curve, window = [], []
    start = time.time()
    stream = batches(text.train, cfg, g)
    for step in range(cfg.fp32_steps):
        loss = next_byte_loss(model, next(stream))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append(loss.item())
        if len(window) == cfg.curve_every or step == cfg.fp32_steps - 1:
            curve.append([step + 1, sum(window) / len(window)])
            log(f"  fp32 step {step + 1:5d}  train loss {curve[-1][1]:.4f}")
            window = []
    return {"curve": curve, "seconds": time.time() - start}


def ddq_config(cfg: LMConfig) -> ddq.DDQConfig:
    """Adaptive per-channel weights learned from 8 down to 2 bits; activations uniform 8-bit.

    Every activation quantizer is fixed at ``act_bits`` on a uniform grid (an int8/uint8
    grid, signedness from calibration): under an average-weight-bits budget nothing
    pulls activation bits down, and the uniform grid is a rounding where the adaptive
    one is a search over 255 midpoints for every activation element (the most of a
    DDQ step's time in a profile of this model).
    The first and last ``nn.Linear`` in execution order (block 0's ``q`` and the LM head)
    keep ddq's default convention: weights and inputs fixed at 8 bits.
    """
    act = ddq.QuantizerConfig(signed=None, mode="uniform", max_bits=cfg.act_bits, bits=cfg.act_bits)
    return ddq.DDQConfig(activation=act)


def quantize(
    fp32_state: dict[str, torch.Tensor],
    text: StdlibText,
    cfg: LMConfig,
    avg_bits: float,
    log: Callable[[str], None],
) -> tuple[TinyLM, ddq.DDQTrainer, dict[str, Any]]:
    """DDQ from the FP32 weights under ``avg_weight_bits=avg_bits``, in a loop written here."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    model = cfg.model()
    model.load_state_dict(fp32_state)
    example = torch.zeros(1, cfg.seq_len, dtype=torch.long)
    ddq.prepare(model, ddq_config(cfg), example_inputs=example)
    train = ddq.TrainConfig(
        epochs=cfg.ddq_epochs,
        freeze_epochs=cfg.freeze_epochs,
        calib_batches=cfg.calib_batches,
        fit_batches=cfg.fit_batches,
        lr_levels=cfg.lr_levels,
        lr_gates=cfg.lr_gates,
        seed=cfg.seed,
        progress=False,
    )
    budget = ddq.Budget(avg_weight_bits=avg_bits, max_act_bits=cfg.act_bits)
    trainer = ddq.DDQTrainer(model, budget, train, steps_per_epoch=cfg.ddq_steps_per_epoch)
    stream = batches(text.train, cfg, g)
    trainer.calibrate(stream)

    # Our own optimizers on ddq's three parameter groups: AdamW suits a transformer's
    # weights better than the SGD of trainer.optimizer(); levels and gates as ddq's.
    weights, levels, gates = split_parameters(model)
    opt_w = torch.optim.AdamW(weights, lr=cfg.ddq_lr, weight_decay=0.0)
    opt_q = torch.optim.Adam(
        [{"params": levels, "lr": cfg.lr_levels}, {"params": gates, "lr": cfg.lr_gates}]
    )
    total = cfg.ddq_epochs * cfg.ddq_steps_per_epoch
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))  # noqa: E731
    sched_w = torch.optim.lr_scheduler.LambdaLR(opt_w, cosine)
    sched_q = torch.optim.lr_scheduler.LambdaLR(opt_q, [cosine, lambda _: 1.0])

    curve, window = [], []
    start = time.time()
    model.train()
    for _epoch in range(cfg.ddq_epochs):
        if trainer.should_finalize:
            # The learning phase is over: meet the budget exactly (bits ranked by the
            # gate logits, ties by the gate gradients of our next-byte loss), freeze bits.
            actions = trainer.finalize(stream, next_byte_loss)
            log(f"  finalize: {len(actions)} bit(s) moved, budget used {trainer.usage():.2%}")
        for _ in range(cfg.ddq_steps_per_epoch):
            task = next_byte_loss(model, next(stream))
            loss = trainer.loss(task)  # + the budget term while the bits learn
            opt_w.zero_grad(set_to_none=True)
            opt_q.zero_grad(set_to_none=True)
            loss.backward()
            opt_w.step()
            opt_q.step()
            sched_w.step()
            sched_q.step()
            trainer.step()  # dual ascent on lambda, annealing of the target
            window.append(task.item())
            if len(window) == cfg.curve_every:
                avg = sum(window) / len(window)
                curve.append([trainer.steps, avg, ddq.CostModel(model).avg_weight_bits()])
                log(
                    f"  ddq{avg_bits:g} step {trainer.steps:4d}  loss {avg:.4f}  "
                    f"avg weight bits {curve[-1][2]:.2f}  lambda {trainer.lam:.3f}"
                )
                window = []
    trainer.finalize(stream, next_byte_loss)  # a no-op when it ran above
    return model, trainer, {"curve": curve, "seconds": time.time() - start}


def continue_fp32(
    fp32_state: dict[str, torch.Tensor], text: StdlibText, cfg: LMConfig
) -> dict[str, Any]:
    """The control: the FP32 model trained on for as many steps as DDQ trains, with DDQ's
    weight optimizer and schedule, in float. The FP32 run stops before convergence, so
    part of what DDQ's steps gain is plain extra training; this separates the two.
    """
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)  # DDQ's data stream
    model = cfg.model()
    model.load_state_dict(fp32_state)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.ddq_lr, weight_decay=0.0)
    total = cfg.ddq_epochs * cfg.ddq_steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    start = time.time()
    model.train()
    stream = batches(text.train, cfg, g)
    for _ in range(total):
        loss = next_byte_loss(model, next(stream))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return {**evaluate(model, text.val, cfg), "steps": total, "seconds": time.time() - start}


def layer_bits(model: nn.Module) -> list[dict[str, Any]]:
    """Per-layer bits and sizes from ``ddq.summary`` (plain data)."""
    keep = ("name", "type", "params", "w_bits", "a_bits", "mode", "note")
    return [{k: row.get(k) for k in keep} for row in ddq.summary(model)]


def export_and_reload(
    model: TinyLM, cfg: LMConfig, path: Path, probe: torch.Tensor
) -> dict[str, Any]:
    """``ddq.export`` then ``ddq.load`` (architecture from a factory); compare logits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    info = ddq.export(model, path, arch=cfg.model().arch())
    runtime = ddq.load(path, model_factory=lambda arch: TinyLM(**arch["kwargs"]))
    model.eval()
    with torch.no_grad():
        diff = (runtime(probe) - model(probe)).abs().max().item()
    return {
        "artifact_bytes": info.artifact_bytes,
        "fp32_bytes": info.fp32_bytes,
        "ratio": info.ratio,
        "max_abs_logit_diff_after_load": diff,
    }


def run(
    cfg: LMConfig,
    results_dir: Path | None = HERE / "results",
    work_dir: Path = ROOT / "runs" / "language_model",
    fp32_from: Path | None = None,
    log: Callable[[str], None] = print,
    command: str = "",
) -> dict[str, Any]:
    """The whole example; returns the results (and the models under ``"_models"``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    text = load_stdlib_text()
    data = text.describe()
    log(
        f"stdlib text: Python {data['python_version']}, {data['train_bytes']:,} training and "
        f"{data['val_bytes']:,} validation bytes, sha256 {data['sha256'][:16]}..."
    )
    torch.manual_seed(cfg.seed)
    fp32 = cfg.model()
    if fp32_from is not None:
        saved = torch.load(fp32_from, weights_only=True)
        if saved["config"] != _model_fields(cfg) or saved["sha256"] != text.sha256:
            raise ValueError(f"{fp32_from} was trained with another model or text")
        fp32.load_state_dict(saved["state"])
        fp32_train = saved["train"]
        log(f"FP32 weights from {fp32_from}")
    else:
        log(f"FP32 training: {sum(p.numel() for p in fp32.parameters()):,} parameters")
        fp32_train = train_fp32(fp32, text, cfg, log)
        work_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"state": fp32.state_dict(), "config": _model_fields(cfg), "sha256": text.sha256,
             "train": fp32_train},
            work_dir / "fp32.pt",
        )  # fmt: skip
    fp32_eval = evaluate(fp32, text.val, cfg)
    log(f"FP32 validation perplexity {fp32_eval['ppl']:.4f}")
    probe = next(sequential_windows(text.val, cfg.seq_len, 8))[0]

    results: dict[str, Any] = {
        "command": command,
        "data": data,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ddq": ddq.__version__,
            "threads": torch.get_num_threads(),
        },
        "config": dataclasses.asdict(cfg),
        "activations": f"every activation quantizer fixed at {cfg.act_bits} bits, uniform grid",
        "fp32": {
            **fp32_eval,
            **fp32_train,
            "parameters": sum(p.numel() for p in fp32.parameters()),
        },
        "ddq": [],
        "_models": {"fp32": fp32},
    }
    state = {k: v.clone() for k, v in fp32.state_dict().items()}
    if cfg.budgets:
        results["fp32_continued"] = continue_fp32(state, text, cfg)
        log(
            f"FP32 trained {results['fp32_continued']['steps']} more steps (the control): "
            f"perplexity {results['fp32_continued']['ppl']:.4f}"
        )
    for bits in cfg.budgets:
        log(f"DDQ at an average of {bits:g} weight bits, activations {cfg.act_bits} bits")
        model, trainer, trace = quantize(state, text, cfg, bits, log)
        ev = evaluate(model, text.val, cfg)
        cm = ddq.CostModel(model)
        entry = {
            "budget": trainer.budget.to_dict(),
            **ev,
            "ppl_vs_fp32": ev["ppl"] / fp32_eval["ppl"] - 1,
            "ppl_vs_fp32_continued": ev["ppl"] / results["fp32_continued"]["ppl"] - 1,
            "avg_weight_bits": cm.avg_weight_bits(),
            "budget_usage": trainer.usage(),
            "bits_moved_by_finalize": len(trainer.fit_actions),
            "layers": layer_bits(model),
            "float_layers": [list(f) for f in model.ddq_state.float_layers],
            **trace,
            **export_and_reload(model, cfg, work_dir / f"ddq_w{bits:g}.ddq.safetensors", probe),
        }
        log(
            f"  DDQ {bits:g} bits: perplexity {ev['ppl']:.4f} ({entry['ppl_vs_fp32']:+.2%} vs "
            f"FP32), average weight bits {entry['avg_weight_bits']:.3f}, "
            f"artifact {entry['artifact_bytes']:,} B, reload max |diff| "
            f"{entry['max_abs_logit_diff_after_load']:g}"
        )
        results["ddq"].append(entry)
        results["_models"][f"ddq{bits:g}"] = model
    results["seconds"] = time.time() - t0
    if results_dir is not None:
        write_results(results, results_dir)
    return results


def _model_fields(cfg: LMConfig) -> dict[str, Any]:
    names = ("d_model", "n_layers", "n_heads", "seq_len", "batch_size", "fp32_steps", "fp32_lr",
             "fp32_warmup", "fp32_min_lr_frac", "seed")  # fmt: skip
    return {k: getattr(cfg, k) for k in names}


def write_results(results: dict[str, Any], out: Path) -> None:
    """``language_model.json`` and ``language_model.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    plain = {k: v for k, v in results.items() if not k.startswith("_")}
    (out / "language_model.json").write_text(json.dumps(plain, indent=1) + "\n")
    (out / "language_model.md").write_text(markdown(plain))


def markdown(r: dict[str, Any]) -> str:
    """A short human-readable report of the results."""
    d, fp, c = r["data"], r["fp32"], r["config"]
    lines = [
        "# DDQ on a byte-level language model (Python stdlib text)",
        "",
        f"Command: `{r['command']}`  ",
        f"Python {d['python_version']} standard library, {len(d['train_files'])} training "
        f"modules ({d['train_bytes']:,} bytes), {len(d['val_files'])} validation modules "
        f"({d['val_bytes']:,} bytes: {', '.join(d['val_files'])}); text SHA-256 "
        f"`{d['sha256']}`.  ",
        f"TinyLM d_model={c['d_model']}, {c['n_layers']} blocks, {c['n_heads']} heads, "
        f"context {c['seq_len']} bytes, {fp['parameters']:,} parameters; torch "
        f"{r['environment']['torch']}, {r['environment']['threads']} threads, "
        f"{r['seconds'] / 60:.1f} min in all.  ",
        f"Activations: {r['activations']}. Embeddings, LayerNorms, biases and the attention "
        "products stay float; block 0's `q` and the head are fixed at 8 bits (first/last "
        "convention). The control is the FP32 model trained on for as many steps as DDQ "
        "trains, with the same optimizer and schedule, in float: the FP32 run stops before "
        "convergence, and the control separates extra training from quantization.",
        "",
        "| model | avg weight bits | val perplexity | vs FP32 | vs control | bits/byte "
        "| artifact bytes |",
        "|---|---|---|---|---|---|---|",
        f"| FP32 | 32 | {fp['ppl']:.4f} | | | {fp['bits_per_byte']:.4f} | |",
    ]
    if "fp32_continued" in r:
        fc = r["fp32_continued"]
        lines.append(
            f"| FP32 + {fc['steps']} steps (control) | 32 | {fc['ppl']:.4f} "
            f"| {fc['ppl'] / fp['ppl'] - 1:+.2%} | | {fc['bits_per_byte']:.4f} | |"
        )
    for e in r["ddq"]:
        lines.append(
            f"| DDQ, budget {e['budget']['avg_weight_bits']:g} bits | {e['avg_weight_bits']:.3f} "
            f"| {e['ppl']:.4f} | {e['ppl_vs_fp32']:+.2%} | {e['ppl_vs_fp32_continued']:+.2%} "
            f"| {e['bits_per_byte']:.4f} "
            f"| {e['artifact_bytes']:,} |"
        )
    lines += ["", "## Weight bits per layer", ""]
    names = [row["name"] for row in r["ddq"][0]["layers"]] if r["ddq"] else []
    header = " | ".join(f"{e['budget']['avg_weight_bits']:g}-bit budget" for e in r["ddq"])
    lines += [f"| layer | params | {header} |", "|---|---|" + "---|" * len(r["ddq"])]
    for i, name in enumerate(names):
        row = r["ddq"][0]["layers"][i]
        bits = " | ".join(str(e["layers"][i]["w_bits"]) for e in r["ddq"])
        lines.append(f"| {name} | {row['params']:,} | {bits} |")
    lines += ["", "## FP32 training loss (mean over each interval)", ""]
    lines.append(" ".join(f"{s}:{loss:.3f}" for s, loss in fp["curve"]))
    for e in r["ddq"]:
        lines += ["", f"## DDQ {e['budget']['avg_weight_bits']:g}-bit: loss, avg weight bits", ""]
        lines.append(" ".join(f"{s}:{loss:.3f}/{b:.2f}" for s, loss, b in e["curve"]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration (smoke run)")
    parser.add_argument("--fp32-from", type=Path, help="FP32 weights saved by an earlier run")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    args = parser.parse_args(argv)
    cfg = quick_config() if args.quick else LMConfig()
    cfg.threads = args.threads
    command = "python examples/language_model.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    run(cfg, args.out, fp32_from=args.fp32_from, command=command.strip())


if __name__ == "__main__":
    main()
