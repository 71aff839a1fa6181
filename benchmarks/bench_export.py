"""Artifact sizes and ONNX Runtime agreement/latency of exported DDQ models.

For ``resnet18`` and ``mobilenet_v2`` (``ddq.models``, ``small_input=True``, 1-channel
28x28 images of the embedded ``mnist5k``; ddq never downloads weights, so the FP32 model is
trained here for ``--train-steps`` Adam steps (150; 0 with ``--quick``) and its BatchNorm
statistics re-estimated on the training images; the quantized models are that model
prepared, set to fixed bits, and calibrated: post-training quantization):

1. **Size**: every learnable layer at ``b`` bits (weights and input activations, ``b`` = 4
   and 2) with the 8-bit first/last-layer convention, exported with ``ddq.export``: FP32
   bytes, artifact bytes, ratio, average weight bits, and the artifact's overhead over the
   theoretical ``sum(n b / 8) + tables + float parts``.
2. **ONNX agreement**: the 8-bit and the 4-bit model, each in uniform and in adaptive
   mode, exported with ``ddq.export_onnx`` and run in ONNX Runtime (CPU, default graph
   optimisations, which fuse the uniform QDQ pattern into integer ``QLinearConv``
   kernels; and without graph optimisation, i.e. plain QDQ in float), against the
   fake-quantized PyTorch model on the test images: max and mean |ORT - PyTorch| divided
   by max |PyTorch output|, top-1 agreement, and both test accuracies.
   Uniform models are prepared with ``DDQConfig(integer_graph=True)`` (output quantizers
   where the integer graph needs them; ``docs/deploy.md``).
3. **Latency at 224x224** (``--latency-models``; torchvision architectures, 3 channels,
   1000 classes, random weights with BatchNorm statistics from random images, since only
   time is measured): the FP32 ONNX export, ddq's integer export (uniform, 8-bit and 4-bit
   weights and activations, first/last layer 8-bit, ``integer_graph=True``, calibrated on
   random images), and ONNX Runtime's own flow on the same FP32 graph
   (``quant_pre_process`` then ``quantize_static``: QDQ, per-channel int8 weights, uint8
   activations, MinMax on the same random images). Batch 1 and 32, 1 and 2 intra-op
   threads; within one setting every repeat runs all sessions (alternating order), and the
   ratio to FP32 is of the medians. Also: file sizes, and the integer kernels in ONNX
   Runtime's optimized graph (``SessionOptions.optimized_model_filepath``) against the
   convs and matrix products of the model.

Usage:
    PYTHONPATH=src python benchmarks/bench_export.py            # full (about 30 minutes)
    PYTHONPATH=src python benchmarks/bench_export.py --quick    # smoke run

Writes ``export.json`` and ``export.md`` to ``--out-dir`` (default
``benchmarks/results``) and prints the tables.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import datetime
import io
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

try:
    import ddq
except ImportError:  # run from a checkout without PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import ddq

from ddq.conversion.output_quantizers import output_quantizers
from ddq.conversion.presets import preset
from ddq.data import create_dataset
from ddq.deploy import export, export_onnx
from ddq.layers import QuantLayer
from ddq.models import create_model

MODELS = ("resnet18", "mobilenet_v2")
SIZE_BITS = (4, 2)
ONNX_BITS = (8, 4)  # agreement; the latency is measured on the 4-bit uniform model
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger")
FLOAT_PRODUCTS = ("Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def _images(n_train: int, n_test: int) -> tuple[torch.Tensor, ...]:
    """``(train images, train labels, test images, test labels)`` from mnist5k."""
    splits = create_dataset("mnist5k", subset=max(n_train, n_test))
    train = [splits.train[i] for i in range(n_train)]
    test = [splits.test[i] for i in range(n_test)]
    return (
        torch.stack([x for x, _ in train]),
        torch.tensor([int(y) for _, y in train]),
        torch.stack([x for x, _ in test]),
        torch.tensor([int(y) for _, y in test]),
    )


def _float_model(
    name: str, images: torch.Tensor, labels: torch.Tensor, steps: int, batch: int
) -> nn.Module:
    """The FP32 model: trained for ``steps`` Adam steps (a random network is chaotic: a
    one-step rounding difference deep inside it can change its output a lot, which would
    say more about the random weights than about the export); BatchNorm statistics from
    the training images either way."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=1, small_input=True)
    g = torch.Generator().manual_seed(0)
    if steps:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(images), (batch,), generator=g)
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # re-estimate: cumulative average over the batches
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for x in images.split(batch):
            model(x)
    return model.eval()


def _quantized(
    float_model: nn.Module, bits: int, mode: str, batches: list[torch.Tensor]
) -> nn.Module:
    model = copy.deepcopy(float_model)
    cfg = ddq.DDQConfig(
        weight=ddq.QuantizerConfig(mode=mode),
        activation=ddq.QuantizerConfig(mode=mode, signed=None),
        integer_graph=mode == "uniform",  # adaptive exports as Gather: no integer kernels
    )
    ddq.prepare(model, cfg, example_inputs=batches[0][:1])
    state = model.ddq_state
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer) and name not in (state.first, state.last):
            m.weight_quantizer.set_bits(bits)
            if m.input_quantizer is not None:
                m.input_quantizer.set_bits(bits)
    for name, q in output_quantizers(model).items():
        if state.output_quantizers[name] != state.last:  # the logits keep the last layer's
            q.set_bits(bits)
    ddq.calibrate(model, batches)
    return model.eval()


def _session(path: Path, threads: int, optimized: Path | None = None, level: Any = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if level is not None:
        so.graph_optimization_level = level
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(session: Any, x: torch.Tensor) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _op_counts(path: Path) -> dict[str, int]:
    import onnx

    return dict(collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node))


def _latency(
    sessions: dict[str, Any], x: torch.Tensor, repeats: int, iters: int
) -> dict[str, float]:
    """Median over ``repeats`` of the mean time per run (ms); sessions alternate order."""
    names = list(sessions)
    for name in names:  # warm-up
        for _ in range(3):
            _run(sessions[name], x)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            for _ in range(iters):
                _run(sessions[name], x)
            times[name].append((time.perf_counter() - t0) / iters * 1e3)
    return {n: statistics.median(t) for n, t in times.items()}


def bench_model(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    train, train_labels, test, test_labels = _images(args.train_images, args.agree_images)
    t0 = time.perf_counter()
    float_model = _float_model(name, train, train_labels, args.train_steps, args.batch)
    train_batches = list(train[: args.calib_images].split(args.batch))
    with torch.no_grad():
        fp32_acc = float((float_model(test).argmax(1) == test_labels).float().mean())
    result: dict[str, Any] = {
        "model": name,
        "train_steps": args.train_steps,
        "fp32_test_accuracy": fp32_acc,
        "sizes": [],
        "onnx": {},
    }
    print(
        f"  {name}: trained {args.train_steps} steps in {time.perf_counter() - t0:.0f} s, "
        f"FP32 accuracy {fp32_acc:.3f}",
        flush=True,
    )

    for bits in SIZE_BITS:
        model = _quantized(float_model, bits, "uniform", train_batches)
        info = export(model, work / f"{name}_{bits}.ddq.safetensors")
        result["sizes"].append(
            {
                "assignment": f"{bits}-bit (first/last 8-bit)",
                "fp32_bytes": info.fp32_bytes,
                "artifact_bytes": info.artifact_bytes,
                "theoretical_bytes": round(info.theoretical_bytes),
                "ratio": info.ratio,
                "avg_weight_bits": info.avg_weight_bits,
                "overhead": info.overhead,
            }
        )
        print(f"  {name} {bits}-bit: {info}", flush=True)

    import onnxruntime as ort

    example = test[: args.batch]
    for bits, mode in itertools.product(ONNX_BITS, ("uniform", "adaptive")):
        key = f"{mode} {bits}-bit"
        model = _quantized(float_model, bits, mode, train_batches)
        with torch.no_grad():
            ref = model(test).numpy()
        path = export_onnx(model, work / f"{name}_{mode}{bits}.onnx", example, dynamic_batch=True)
        optimized = work / f"{name}_{mode}{bits}.opt.onnx"
        session = _session(path, args.threads, optimized)
        out = _run(session, test)
        plain = _run(
            _session(path, args.threads, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL), test
        )
        counts = _op_counts(optimized)
        scale = float(np.abs(ref).max())
        result["onnx"][key] = {
            "max_abs_diff_over_output_scale": float(np.abs(out - ref).max()) / scale,
            "mean_abs_diff_over_output_scale": float(np.abs(out - ref).mean()) / scale,
            "unoptimized_max_abs_diff_over_output_scale": float(np.abs(plain - ref).max()) / scale,
            "top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
            "accuracy_pytorch": float((ref.argmax(1) == test_labels.numpy()).mean()),
            "accuracy_ort": float((out.argmax(1) == test_labels.numpy()).mean()),
            "images": len(test),
            "integer_ops_after_ort_fusion": {k: counts[k] for k in INTEGER_OPS if k in counts},
            "float_convs_after_ort_fusion": sum(
                counts.get(k, 0) for k in ("Conv", "FusedConv", "NchwcConv")
            ),
        }
        print(f"  {name} onnx {key}: {result['onnx'][key]}", flush=True)
    return result


def _export_fp32(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    assert program is not None
    program.save(path, external_data=False)
    return path


def _ort_flow(fp32_path: Path, batches: list[torch.Tensor], path: Path) -> Path:
    """ONNX Runtime's documented static quantization of the FP32 graph."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": b.numpy()} for b in batches])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    pre = path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre))
    quantize_static(
        str(pre),
        str(path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return path


def _fusion(path: Path, work: Path, n_products: int) -> dict[str, Any]:
    optimized = work / (path.stem + ".opt.onnx")
    _session(path, 1, optimized)
    counts = _op_counts(optimized)
    fused = sum(counts.get(k, 0) for k in INTEGER_OPS)
    return {
        "integer_kernels": fused,
        "convs_and_matmuls": n_products,
        "float_products_left": sum(counts.get(k, 0) for k in FLOAT_PRODUCTS),
        "integer_ops": {k: counts[k] for k in INTEGER_OPS if k in counts},
    }


def bench_latency(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """ddq's integer export vs FP32 vs ONNX Runtime's own flow at 224x224 (see the module
    docstring, item 3)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=1000, in_channels=3, small_input=False)
    size = args.latency_size
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, size, size, generator=g) for _ in range(args.latency_calib)]
    for m in model.modules():  # BatchNorm statistics of these images, not identity
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for b in calib:
            model(b)
    model.eval()
    n_products = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())
    example = calib[0][:1]
    paths = {"fp32": _export_fp32(model, example, work / f"{name}_224_fp32.onnx")}
    paths["ort_flow"] = _ort_flow(paths["fp32"], calib, work / f"{name}_224_ort.onnx")
    int8_mapping: dict[str, dict[str, float]] = {}
    for bits in args.latency_bits:
        q = copy.deepcopy(model)
        uniform = {"mode": "uniform", "max_bits": 8}
        cfg = ddq.DDQConfig(
            weight=ddq.QuantizerConfig(bits=bits, **uniform),
            activation=ddq.QuantizerConfig(bits=bits, signed=None, **uniform),
            integer_graph=True,
        )
        ddq.prepare(q, cfg, example_inputs=example)
        ddq.calibrate(q, calib, num_batches=len(calib))
        key = f"ddq_int{bits}"
        paths[key] = export_onnx(
            q.eval(), work / f"{name}_224_{key}.onnx", example, dynamic_batch=True
        )
        # The int8 preset: adaptive (Lloyd) weight levels mapped onto int8 codes.
        q = copy.deepcopy(model)
        cfg = preset("int8")
        cfg.weight = cfg.weight.replace("bench", bits=bits)
        cfg.activation = cfg.activation.replace("bench", bits=bits, signed=None)
        ddq.prepare(q, cfg, example_inputs=example)
        ddq.calibrate(q, calib, num_batches=len(calib))
        key = f"ddq_int8preset{bits}"
        mapping: dict[str, Any] = {}
        paths[key] = export_onnx(
            q.eval(), work / f"{name}_224_{key}.onnx", example, dynamic_batch=True, report=mapping
        )
        errs = sorted(mapping["int8_mapping"].values())
        int8_mapping[key] = {"median": errs[len(errs) // 2], "max": errs[-1]}
    result: dict[str, Any] = {
        "model": name,
        "input": [3, size, size],
        "file_bytes": {k: p.stat().st_size for k, p in paths.items()},
        "fusion": {k: _fusion(p, work, n_products) for k, p in paths.items() if k != "fp32"},
        "int8_mapping_relative_rmse": int8_mapping,
        "latency_ms": {},
        "ratio_to_fp32": {},
    }
    print(f"  {name} 224: sizes {result['file_bytes']}, fusion {result['fusion']}", flush=True)
    for batch, threads in itertools.product((1, 32), (1, 2)):
        x = torch.randn(batch, 3, size, size, generator=g)
        sessions = {k: _session(p, threads) for k, p in paths.items()}
        repeats, iters = (args.repeats, args.iters) if batch == 1 else (args.batch_repeats, 1)
        ms = _latency(sessions, x, repeats, iters)
        setting = f"batch {batch}, {threads} thread{'s' if threads > 1 else ''}"
        result["latency_ms"][setting] = ms
        result["ratio_to_fp32"][setting] = {k: v / ms["fp32"] for k, v in ms.items() if k != "fp32"}
        print(f"  {name} {setting}: {ms}", flush=True)
    return result


def _markdown(
    results: list[dict[str, Any]], meta: dict[str, Any], latency: list[dict[str, Any]]
) -> str:
    lines = [
        "# Export: artifact size, ONNX Runtime agreement and latency",
        "",
        f"Command: `{meta['command']}`  ",
        f"{meta['date']}; torch {meta['torch']}, onnxruntime {meta['onnxruntime']}, "
        f"{meta['threads']} thread(s), batch {meta['batch']}, {meta['machine']}",
        "",
        "## Artifact size (uniform mode; every learnable layer at b bits, first/last 8-bit)",
        "",
        "| model | assignment | FP32 bytes | artifact bytes | ratio | avg weight bits | "
        "overhead vs theoretical |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for s in r["sizes"]:
            lines.append(
                f"| {r['model']} | {s['assignment']} | {s['fp32_bytes']:,} | "
                f"{s['artifact_bytes']:,} | {s['ratio']:.2f}x | {s['avg_weight_bits']:.2f} | "
                f"{s['overhead']:+.1%} |"
            )
    lines += [
        "",
        "## ONNX Runtime vs the fake-quantized PyTorch model (first/last layer 8-bit)",
        "",
        "FP32 models trained for "
        + ", ".join(
            f"{r['model']}: {r['train_steps']} steps, test accuracy {r['fp32_test_accuracy']:.3f}"
            for r in results
        )
        + " (4-bit models: post-training quantization, no fine-tuning).",
        "",
        "| model | mode, bits | max abs diff / max abs output | mean abs diff / max abs output | "
        "same, ORT without graph optimisation | top-1 agreement | accuracy PyTorch / ORT | "
        "integer ops after ORT fusion | float convs left |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        for mode, o in r["onnx"].items():
            ints = ", ".join(f"{k} x{v}" for k, v in o["integer_ops_after_ort_fusion"].items())
            lines.append(
                f"| {r['model']} | {mode} | {o['max_abs_diff_over_output_scale']:.2e} | "
                f"{o['mean_abs_diff_over_output_scale']:.2e} | "
                f"{o['unoptimized_max_abs_diff_over_output_scale']:.2e} | "
                f"{o['top1_agreement']:.3f} ({o['images']} images) | "
                f"{o['accuracy_pytorch']:.3f} / {o['accuracy_ort']:.3f} | {ints or '-'} | "
                f"{o['float_convs_after_ort_fusion']} |"
            )
    if not latency:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "## ONNX Runtime latency at 224x224: ddq's integer export vs ONNX Runtime's own flow",
        "",
        "torchvision architectures, random weights, 1000 classes. `ddq_intB`: uniform B-bit "
        "weights and activations (first/last layer 8-bit), `integer_graph=True`; `ort_flow`: "
        "`quant_pre_process` + `quantize_static` (QDQ, per-channel int8 weights, uint8 "
        "activations). Ratios are ms / FP32 ms in the same setting (medians; batch 32: "
        f"{meta['batch_repeats']} repeats of 1 run, batch 1: {meta['repeats']} of "
        f"{meta['iters']}). `ddq / ORT` is the ddq ratio over ORT's ratio.",
        "",
        "| model | setting | FP32 ms | "
        + " | ".join(f"{k} / FP32" for k in _quant_keys(latency))
        + " | "
        + " | ".join(f"{k} / ORT" for k in _quant_keys(latency) if k != "ort_flow")
        + " |",
        "|---|---|---:|" + "---:|" * (2 * len(_quant_keys(latency)) - 1),
    ]
    for r in latency:
        for setting, ratios in r["ratio_to_fp32"].items():
            keys = _quant_keys(latency)
            cells = [f"{ratios[k]:.2f}" for k in keys]
            cells += [f"{ratios[k] / ratios['ort_flow']:.2f}" for k in keys if k != "ort_flow"]
            lines.append(
                f"| {r['model']} | {setting} | {r['latency_ms'][setting]['fp32']:.1f} | "
                + " | ".join(cells)
                + " |"
            )
    lines += [
        "",
        "| model | file | bytes | integer kernels / convs+matmuls | float convs/matmuls left |",
        "|---|---|---:|---:|---:|",
    ]
    for r in latency:
        for k, size in r["file_bytes"].items():
            f = r["fusion"].get(k)
            fused = f"{f['integer_kernels']} / {f['convs_and_matmuls']}" if f else "-"
            left = f["float_products_left"] if f else "-"
            lines.append(f"| {r['model']} | {k} | {size:,} | {fused} | {left} |")
    return "\n".join(lines) + "\n"


def _quant_keys(latency: list[dict[str, Any]]) -> list[str]:
    first = next(iter(latency[0]["ratio_to_fp32"].values()))
    return sorted(first)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer repeats")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch", type=int, default=None, help="latency batch (32; quick 8)")
    parser.add_argument(
        "--agree-images", type=int, default=None, help="test images for agreement (256; quick 16)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="latency repeats (15; quick 3)")
    parser.add_argument("--iters", type=int, default=None, help="runs per repeat (5; quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (torch and ORT)")
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument(
        "--train-steps", type=int, default=None, help="FP32 training steps (150; quick 0)"
    )
    parser.add_argument("--latency-models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--latency-size", type=int, default=224)
    parser.add_argument("--latency-bits", nargs="+", type=int, default=[8, 4])
    parser.add_argument(
        "--latency-calib", type=int, default=None, help="batches of 8 random images (4; quick 1)"
    )
    parser.add_argument(
        "--batch-repeats", type=int, default=None, help="batch-32 latency repeats (3; quick 1)"
    )
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    args.batch = args.batch or (8 if args.quick else 32)
    args.agree_images = max(args.agree_images or (16 if args.quick else 256), args.batch)
    args.repeats = args.repeats or (3 if args.quick else 15)
    args.iters = args.iters or (2 if args.quick else 5)
    args.latency_calib = args.latency_calib or (1 if args.quick else 4)
    args.batch_repeats = args.batch_repeats or (1 if args.quick else 3)
    args.train_steps = (
        args.train_steps if args.train_steps is not None else (0 if args.quick else 150)
    )
    if args.quick:
        args.calib_images = min(args.calib_images, 64)
        args.train_images = min(args.train_images, 256)
    torch.set_num_threads(args.threads)

    import onnxruntime

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(f"{name}:", flush=True)
            results.append(bench_model(name, args, Path(tmp)))
        latency = []
        for name in args.latency_models:
            print(f"{name} at {args.latency_size}x{args.latency_size}:", flush=True)
            latency.append(bench_latency(name, args, Path(tmp)))
    meta = {
        "command": " ".join(["python", "benchmarks/bench_export.py", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "threads": args.threads,
        "batch": args.batch,
        "repeats": args.repeats,
        "iters": args.iters,
        "batch_repeats": args.batch_repeats,
        "quick": args.quick,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "export.json").write_text(
        json.dumps({"meta": meta, "results": results, "latency": latency}, indent=2) + "\n"
    )
    md = _markdown(results, meta, latency)
    (args.out_dir / "export.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
