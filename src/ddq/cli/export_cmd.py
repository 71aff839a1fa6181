"""``ddq export``: write a finished run as a packed low-bit artifact (and optionally ONNX)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to ``subparsers``.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_parser(parser.add_subparsers(dest="command"))  # doctest: +ELLIPSIS
        ArgumentParser(prog='... export', ...)
    """
    p = subparsers.add_parser(
        "export",
        help="write a trained run as a packed low-bit artifact (and optionally ONNX)",
        description="Freeze a finished run's model to its learned bits: a safetensors "
        "artifact with b-bit packed weights (load it with ddq.load), checked against the "
        "run's model; --onnx also writes standard-op ONNX for ONNX Runtime (dimension 0, the "
        "batch, left dynamic).",
    )
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR_OR_CHECKPOINT",
        type=Path,
        help="run folder written by `ddq quantize`, or a file inside it",
    )
    p.add_argument("--out", type=Path, required=True, help="artifact to write (*.safetensors)")
    p.add_argument("--onnx", type=Path, default=None, help="also write this ONNX file")
    p.add_argument(
        "--check-images",
        type=int,
        default=256,
        metavar="N",
        help="with --onnx: run N of the run's test images through ONNX Runtime and the "
        "trained model and print how well they agree (0: skip; needs onnxruntime)",
    )
    p.add_argument("--data-root", default=None, help="override the run's dataset folder")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Export the run in ``args.run_dir`` to ``args.out`` (and ``args.onnx``); 0 on success.

    The artifact is loaded back and run on the example input: a mismatch with the trained
    model is an error, so a written artifact is known to reproduce it.
    """
    import torch

    from ..deploy import export, export_onnx, load
    from ..jobs.run import load_run

    source = args.run_dir if args.run_dir.is_dir() else args.run_dir.parent
    model, example = load_run(source)
    info = export(model, args.out)
    print(info)
    # The registry name is the reference when the run recorded one; else the model itself.
    runtime = load(args.out, model=None if getattr(model, "ddq_arch", None) else model)
    with torch.no_grad():
        want, got = model(example), runtime(example)
    scale = max(float(want.abs().max()), 1e-12)
    diff = float((got - want).abs().max()) / scale
    if diff > 1e-5:
        raise ValueError(
            f"{args.out}: the loaded artifact differs from the trained model by {diff:.2e} of "
            "the output scale"
        )
    print(f"checked: ddq.load({str(args.out)!r}) reproduces the model (max diff {diff:.1e})")
    if args.onnx is not None:
        # The run's example is one image; a deployed graph must take any batch size.
        export_onnx(model, args.onnx, example, dynamic_batch=True)
        print(f"wrote {args.onnx} (any batch size)")
        if args.check_images > 0:
            _check_onnx(model, args, source)
    return 0


def _test_images(run_dir: Path, n: int, data_root: str | None) -> tuple[Any, Any]:
    """The first ``n`` test images of the run's dataset and their labels."""
    import torch

    from .eval_cmd import run_splits

    splits, _ = run_splits(run_dir, data_root)
    items = [splits.test[i] for i in range(min(n, len(splits.test)))]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def _check_onnx(model: Any, args: argparse.Namespace, run_dir: Path) -> None:
    """Print ONNX Runtime's agreement with the trained model on the run's test images.

    Not an error when they differ slightly: ONNX Runtime sums in another order, and a value
    a few ulps away can land across a quantization threshold (BENCHMARKS.md section 3).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        print("skipped the ONNX Runtime check: onnxruntime is not installed (pip install "
              "'ddq[onnx]')")  # fmt: skip
        return
    import numpy as np
    import torch

    x, y = _test_images(run_dir, args.check_images, args.data_root)
    session = ort.InferenceSession(str(args.onnx), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = np.concatenate([session.run(None, {name: b.numpy()})[0] for b in x.split(64)])
    with torch.no_grad():
        want = torch.cat([model(b) for b in x.split(64)]).numpy()
    diff = float(np.abs(got - want).max()) / max(float(np.abs(want).max()), 1e-12)
    agree = float((got.argmax(1) == want.argmax(1)).mean())
    labels = y.numpy()
    print(
        f"ONNX Runtime on {len(x)} test images: top-1 agreement {100 * agree:.1f}%, accuracy "
        f"{100 * float((want.argmax(1) == labels).mean()):.2f}% (PyTorch) / "
        f"{100 * float((got.argmax(1) == labels).mean()):.2f}% (ONNX Runtime), max |diff| "
        f"{100 * diff:.1f}% of the output scale"
    )
