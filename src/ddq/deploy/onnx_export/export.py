"""The ONNX export's entry point, :func:`export_onnx` (see :mod:`ddq.deploy.onnx_export`)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...conversion.macs import as_args
from . import passes
from .layers import OnnxLayer, deploy_model, to_export_form
from .ops import translations

__all__ = ["DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "export_onnx"]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 20
MIN_OPSET, MAX_OPSET = 18, 23


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_inputs: Any,
    *,
    opset_version: int = DEFAULT_OPSET,
    fold_batchnorm: bool = True,
    dynamic_batch: bool = False,
    adaptive_weights: str = "auto",
    report: dict[str, Any] | None = None,
) -> Path:
    """Export a DDQ model to ONNX (standard ops; see the module docstring for the graph).

    Args:
        model: a prepared, calibrated model (frozen on the fly) or one from ``ddq.load``;
            it is not modified.
        path: the ``.onnx`` file to write (weights inside the file).
        example_inputs: a tensor or tuple of positional inputs (shapes of the graph).
        opset_version: ONNX opset, 18..23 (default 20).
        fold_batchnorm: fold BatchNorms after uniform convs into their dequantization scale.
        dynamic_batch: make dimension 0 of every input dynamic.
        adaptive_weights: ``"auto"`` (default): adaptive weights whose layer input is
            uniform (the ``int8`` preset) export as per-channel int8 codes, so ONNX Runtime
            runs the layer as an integer kernel, at the cost of mapping each learned level
            onto the int8 grid; other adaptive weights export exactly as ``Gather`` on
            their levels. ``"int8"`` maps every adaptive layer, ``"table"`` none.
        report: a dict that receives ``"int8_mapping"``: ``{layer: relative RMSE}`` of
            every layer mapped to int8 (also logged at INFO).

    Returns:
        ``path`` as a ``Path``.

    Example:
        >>> export_onnx(model, "model.onnx", torch.randn(1, 3, 32, 32))  # doctest: +SKIP
        >>> import onnxruntime as ort
        >>> ort.InferenceSession("model.onnx").run(None, {"x": x.numpy()})  # doctest: +SKIP
    """
    import onnx

    if not MIN_OPSET <= opset_version <= MAX_OPSET:
        raise ValueError(
            f"opset_version must be in {MIN_OPSET}..{MAX_OPSET}, got {opset_version} (the "
            "PyTorch exporter builds opset 18 graphs; older ones need a lossy conversion)"
        )
    path = Path(path)
    args = as_args(example_inputs)
    form = to_export_form(deploy_model(model), args, adaptive_weights)
    mapping = {
        n: m.int8_mapping
        for n, m in form.named_modules()
        if isinstance(m, OnnxLayer) and m.int8_mapping is not None
    }
    if mapping:
        logger.info(
            "adaptive weights of %d layer(s) mapped onto int8 grids: relative RMSE "
            "median %.2e, max %.2e (%s)",
            len(mapping),
            sorted(mapping.values())[len(mapping) // 2],
            max(mapping.values()),
            max(mapping, key=mapping.__getitem__),
        )
    if report is not None:
        report["int8_mapping"] = mapping
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic = tuple({0: batch} for _ in args)
    # The exporter prints progress lines even with verbose=False; failures still raise.
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            form,
            args,
            dynamo=True,
            optimize=False,  # it would constant-fold the small Cast+Gather weight decoders
            opset_version=opset_version,
            custom_translation_table=translations(opset_version),
            dynamic_shapes=dynamic,
            verbose=False,
        )
    assert program is not None
    g = passes.Graph(program.model.graph)
    if fold_batchnorm:
        passes.fold_batchnorm(g)
    passes.clamps_to_integer(g)
    passes.drop_requantize(g)
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(program.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path, external_data=False)
    onnx.checker.check_model(str(path))
    return path
