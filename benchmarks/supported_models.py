"""Which torchvision classification models ddq quantizes, exports and reloads bit-exact.

Each model of ``torchvision.models.list_models(module=torchvision.models)`` (random
init, 10 classes, nothing downloaded) goes through the whole public lifecycle at the
smallest input it accepts: ``ddq.prepare`` -> ``ddq.calibrate`` (two random batches) ->
two ``ddq.DDQTrainer`` training steps under a budget -> ``finalize`` -> ``ddq.export``
-> ``ddq.load(model_factory=...)``, whose output must equal the fake-quantized model's
in eval mode bit for bit. ``tests/test_torchvision_zoo.py`` runs :func:`check_model` for
every model; this script runs the same function and writes the table of
``docs/supported_models.md``.

Usage:
    python benchmarks/supported_models.py                    # every model -> docs/supported_models.md
    python benchmarks/supported_models.py resnet18 swin_t    # a few, printed as JSON lines
    python benchmarks/supported_models.py --out FILE.md --json FILE.json
    python benchmarks/supported_models.py --from-rows benchmarks/results/supported_models_rows.jsonl
        # rewrite the table from saved rows (the committed table's rows are there)
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import ddq

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "supported_models.md"
BATCH = 2
NUM_CLASSES = 10
BUDGET = {"avg_weight_bits": 7.5, "max_act_bits": 8}

# The smallest input side each model accepts (default 32) and constructor arguments that
# differ from torchvision's defaults (still the same architecture family).
INPUT_SIDE = {
    "alexnet": 63,  # three stride-2 max-pools after a stride-4 conv need at least 63
    "inception_v3": 75,  # torchvision's stated minimum
    "maxvit_t": 224,  # its windows (7) must tile every stage: the input is 7 * 32
}
# The deepest ResNets diverge in float at 32: their last stage is 1x1, so BatchNorm
# normalises 2 values per channel and the first gradient norm is 1e9..1e11 (the weights
# then overflow the level fit). At 64 (2x2 maps) it is about 1e4, like the other models.
for _name in ("resnet152", "wide_resnet50_2", "wide_resnet101_2", "resnext101_32x8d",
              "resnext101_64x4d"):  # fmt: skip
    INPUT_SIDE[_name] = 64
KWARGS: dict[str, dict[str, Any]] = {
    # The auxiliary head pools 5x5 from a 17x17 map at 299; at 75 the map is too small.
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "googlenet": {"init_weights": True},
}
# Vision transformers learn a position embedding per patch, so the input size is fixed
# at construction: the smallest side that is a whole number of patches (> 1 patch).
for _name, _patch in {"vit_b_16": 16, "vit_b_32": 32, "vit_l_16": 16, "vit_l_32": 32,
                      "vit_h_14": 14}.items():  # fmt: skip
    INPUT_SIDE[_name] = 2 * _patch
    KWARGS[_name] = {"image_size": 2 * _patch}


# Test tiers (see ``tier``), from the CPU seconds of the check measured on the 2-core
# machine (one thread): FAST took at most ~10 s each (~2 min together); HEAVY are the
# models over 100M parameters (1..3 min each, 12.5 CPU-min together), except vgg11,
# efficientnet_v2_l and wide_resnet101_2, which are in SLOW's ~30 min; CI runs both in
# its zoo step (two processes, LARGE in one of them). HUGE, over 600M parameters, peak
# at 13-19 GB (20-30 bytes per parameter: weights, SGD momentum, the second step's saved
# tensors): CI runs them last, alone (``-m huge``).
FAST = {
    "efficientnet_b0", "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3",
    "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_400mf",
    "regnet_x_800mf", "regnet_y_400mf", "regnet_y_800mf", "resnet18", "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "squeezenet1_0",
    "squeezenet1_1",
}  # fmt: skip
HEAVY = {
    "convnext_large", "regnet_x_32gf", "regnet_y_32gf", "vgg11_bn", "vgg13", "vgg13_bn",
    "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "vit_l_16", "vit_l_32",
}  # fmt: skip
HUGE = {"vit_h_14", "regnet_y_128gf"}
# Over 100M parameters (3-10 GB each in the check): CI's two zoo processes must not run
# two of them at once, so the test marks them ``large`` and CI runs them in one process.
LARGE = HEAVY | {"vgg11", "efficientnet_v2_l", "wide_resnet101_2"}

# Types none of which may be left float: what ddq quantizes, and nn.MultiheadAttention
# with its NonDynamicallyQuantizableLinear output, which the attention rewrite replaces.
QUANTIZABLE_TYPES = (
    "Linear",
    "Conv1d",
    "Conv2d",
    "MultiheadAttention",
    "NonDynamicallyQuantizableLinear",
)


def model_names() -> list[str]:
    """The classification models of the installed torchvision, sorted."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build(name: str) -> nn.Module:
    """The float model ``name`` with ``num_classes=10``, random weights (seeded)."""
    torch.manual_seed(0)
    return torchvision.models.get_model(
        name, weights=None, num_classes=NUM_CLASSES, **KWARGS.get(name, {})
    )


def _logits(out: Any) -> torch.Tensor:
    # GoogLeNet returns (logits, aux2, aux1) in training mode.
    return out[0] if isinstance(out, tuple) else out


def _own_params(module: nn.Module) -> str:
    return ", ".join(n for n, _ in module.named_parameters(recurse=False))


def check_model(name: str, workdir: Path) -> dict[str, Any]:
    """Run ``name`` through the whole ddq lifecycle; returns a row of the table.

    Keys: ``model``, ``params``, ``input``, ``quantized`` (number of quantized layers),
    ``float_layers`` (``{reason: count}`` of parameterised layers left float, by type),
    ``artifact_bytes``, ``max_abs_diff`` (loaded runtime against the fake-quantized
    model, eval mode), ``exact`` and ``seconds``. Exceptions propagate.

    Example:
        >>> row = check_model("mobilenet_v3_small", Path("/tmp"))  # doctest: +SKIP
        >>> row["exact"]  # doctest: +SKIP
        True
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    side = INPUT_SIDE.get(name, 32)
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(BATCH, 3, side, side, generator=g) for _ in range(3)]
    labels = [torch.randint(0, NUM_CLASSES, (BATCH,), generator=g) for _ in range(3)]
    batches = list(zip(images[:2], labels[:2], strict=True))

    model = build(name)
    params = sum(p.numel() for p in model.parameters())
    ddq.prepare(model, ddq.DDQConfig(), example_inputs=images[0][:1])
    state = model.ddq_state

    def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
        return F.cross_entropy(_logits(m(batch[0])), batch[1])

    # Batches of 2 random images: train-mode BatchNorm over 2 samples (1x1 maps deep in
    # the net) gives FP32 ResNeXt-50 a 1e9 gradient norm at the stem, so one unclipped
    # SGD step sends weights to 1e13 and the next to overflow. Clipping keeps this
    # lifecycle check about the lifecycle, not about surviving a diverged run.
    config = ddq.TrainConfig(
        epochs=1, freeze_epochs=0, calib_batches=2, fit_batches=1, progress=False, grad_clip=1.0
    )
    trainer = ddq.DDQTrainer(model, ddq.Budget(**BUDGET), config, steps_per_epoch=len(batches))
    trainer.calibrate(batches)
    optimizer = trainer.optimizer()
    model.train()
    for batch in batches:
        # Gradients freed before the forward, not after it: the huge models' peak memory
        # is the forward of the second step, which would otherwise hold the first step's
        # gradients (4 bytes per parameter) beside its own saved tensors.
        optimizer.zero_grad(set_to_none=True)
        loss = trainer.loss(loss_fn(model, batch))
        loss.backward()
        trainer.clip_gradients()
        optimizer.step()
        trainer.step()
    trainer.finalize(batches, loss_fn)
    del optimizer  # its state (momentum, Adam moments) is as large as the model
    model.zero_grad(set_to_none=True)  # finalize's gate-gradient pass left weight gradients
    gc.collect()

    path = workdir / f"{name}.ddq.safetensors"
    info = ddq.export(model, path)
    model.eval()
    with torch.no_grad():
        want = model(images[2])
        runtime = ddq.load(path, model_factory=lambda arch: build(name))
        got = runtime(images[2])
    diff = (got - want).abs().max().item()

    # Name the float parameters too: most "unsupported layers" are a container's own
    # tensor (a position embedding, a class token, a layer scale), not a layer.
    floats = Counter(
        f"{typ} ({_own_params(model.get_submodule(n))}): {why}"
        for n, typ, why in state.float_layers
    )
    row = {
        "model": name,
        "params": params,
        "input": side,
        "quantized": len(state.quantized),
        "float_layers": dict(sorted(floats.items())),
        "artifact_bytes": path.stat().st_size,
        "max_abs_diff": diff,
        "exact": bool(torch.equal(got, want)),
        "seconds": round(time.perf_counter() - start, 1),
        # CPU time of this process: what the check costs on an idle machine (one thread).
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        # Peak resident memory of the process so far (the largest model checked yet).
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1),
    }
    del info, model, runtime, trainer
    path.unlink()
    gc.collect()
    return row


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def tier(name: str) -> str:
    """Where the test runs ``name``: ``"default"`` (every ``pytest`` run), ``"slow"`` or
    ``"heavy"`` (CI's zoo step, ``-m "slow or heavy"``), or ``"huge"`` (CI's last step,
    ``-m huge``, alone: up to 19 GB of memory)."""
    if name in HUGE:
        return "huge"
    return "default" if name in FAST else "heavy" if name in HEAVY else "slow"


def table(rows: list[dict[str, Any]], total: int) -> str:
    """The markdown document for ``rows`` (failed rows carry ``error``, rows of models
    not run ``unchecked``)."""
    ok = sum(1 for r in rows if r.get("exact"))
    unchecked = sum(1 for r in rows if "unchecked" in r)
    conv_linear_left = ", ".join(
        r["model"]
        for r in rows
        if any(k.split(" ")[0] in QUANTIZABLE_TYPES for k in r.get("float_layers", {}))
    )
    budget = ", ".join(f"{k}={v}" for k, v in BUDGET.items())
    lines = [
        "# Supported torchvision models",
        "",
        "Generated by `python benchmarks/supported_models.py` (do not edit by hand; this "
        "copy merges the rows of several runs of it with `--from-rows`); "
        "`tests/test_torchvision_zoo.py` runs the same check (`check_model`) and checks "
        "that this table lists exactly the models of `torchvision.models.list_models`.",
        "",
        f"torchvision {torchvision.__version__}, torch {torch.__version__}. Each model: "
        f"random init, {NUM_CLASSES} classes, batch {BATCH} at the input side shown; "
        "`ddq.prepare` (default `DDQConfig`) -> `ddq.calibrate` on 2 random batches -> "
        f"2 `DDQTrainer` steps under `Budget({budget})` (gradient norm clipped at 1) -> "
        "`finalize` -> `ddq.export` -> "
        "`ddq.load(model_factory=...)`. **pass** means the loaded artifact's output equals "
        "the fake-quantized model's (eval mode) bit for bit.",
        "",
        f"**{ok} of {total} models pass**"
        + (
            f" ({unchecked} not checked in the runs this table was written from)."
            if unchecked
            else "."
        ),
        "",
        "- quantized: Conv/Linear layers replaced by DDQ layers (attention projections "
        "included, after the rewrites of `ddq/layers/attention.py`).",
        "- float left: parameterised modules other than Conv/Linear/BatchNorm/LayerNorm/"
        "GroupNorm, by type (their own parameters) and the reason `prepare` gives; these "
        "are embeddings, class tokens, layer scales and position-bias tables, stored in "
        f"float32. Conv or Linear layers left float: {conv_linear_left or 'none'}.",
        "- tier: `default` runs in every `pytest` run; `slow` and `heavy` in CI's zoo step "
        '(`pytest -m "slow or heavy" tests/test_torchvision_zoo.py`, as two processes); '
        "`huge` (up to 19 GB of memory) in CI's last step, alone (`pytest -m huge ...`).",
        "- s: wall seconds of the whole check on a shared 2-core machine (others' jobs "
        "running); CPU s: its CPU time, one thread (about the wall time on an idle machine; "
        "the huge ones ran on both cores).",
        "",
        "| model | params | input | quantized | float left (why) | artifact | result "
        "| tier | s | CPU s |",
        "|---|---:|---:|---:|---|---:|---|---|---:|---:|",
    ]
    for r in rows:
        name = r["model"]
        if "error" in r or "unchecked" in r:
            result = r["unchecked"] if "unchecked" in r else f"fail: {r['error']}"
            lines.append(f"| {name} | | | | | | {result} | {tier(name)} | | |")
            continue
        floats = "; ".join(f"{k} x{v}" for k, v in r["float_layers"].items()) or "none"
        result = "pass" if r["exact"] else f"fail: max abs diff {r['max_abs_diff']:.3g}"
        lines.append(
            f"| {name} | {_params(r['params'])} | {r['input']} | {r['quantized']} | "
            f"{floats} | {r['artifact_bytes'] / 1e6:.1f} MB | {result} | {tier(name)} | "
            f"{r['seconds']} | {r.get('cpu_seconds', '')} |"
        )
    return "\n".join(lines) + "\n"


def listed_models(doc: str) -> list[str]:
    """The model names of a table written by :func:`table`."""
    out = []
    for line in doc.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if (
            len(cells) > 2
            and cells[1]
            and cells[1] not in ("model",)
            and not set(cells[1]) <= {"-"}
        ):
            out.append(cells[1])
    return out


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows from a ``--json`` file or from the JSON lines a run prints."""
    text = path.read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.startswith('{"model"')]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="default: every classification model")
    parser.add_argument("--out", type=Path, default=None, help=f"markdown (default {DOC})")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--from-rows",
        type=Path,
        nargs="+",
        default=None,
        help="write the table from rows saved by earlier runs (--json files or their "
        "printed JSON lines) instead of running checks; models without a row are listed "
        "as not checked",
    )
    args = parser.parse_args(argv)
    if args.from_rows:
        found = {r["model"]: r for f in args.from_rows for r in _read_rows(f)}
        rows = [
            found.get(n, {"model": n, "unchecked": "not checked (no row in the runs given)"})
            for n in model_names()
        ]
        (args.out or DOC).write_text(table(rows, len(rows)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models or model_names()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            try:
                row = check_model(name, Path(tmp))
            except Exception as e:  # a failing model is a row of the table, not the end
                row = {"model": name, "error": f"{type(e).__name__}: {e}".replace("|", "/")[:200]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    out = args.out or (DOC if not args.models else None)
    if out is not None:
        out.write_text(table(rows, len(model_names())))
    return 0 if all(r.get("exact") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
