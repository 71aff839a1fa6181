"""Load a ddq artifact as an executable model: ``load`` and ``build_runtime``.

``load`` reads the artifact (:func:`ddq.deploy.reader.read_artifact`), gets the
architecture (a model instance you pass, a ``model_factory`` you pass, or, only when you
pass neither, the model registry from the name recorded in the manifest), checks that it
matches the artifact and swaps in the deploy modules of :mod:`ddq.deploy.runtime`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..conversion.bias_rounding import (
    find_bias_targets,
    integer_weight_step,
    remove_bias_rounding,
    rounding_delta,
    set_bias_rounding,
)
from ..conversion.output_quantizers import add_output_quantizer, remove_output_quantizers
from ..layers import kind_named
from ..layers.rewrite import rewrite_modules
from ..quantizer import DDQQuantizer
from .freeze import conv_params
from .manifest import BATCHNORM_KEY, OUTPUTS_KEY, LayerSpec, Manifest
from .reader import read_artifact
from .runtime import (
    KERNELS,
    ChannelAffine,
    FrozenActivationQuantizer,
    PackedConv,
    PackedConv1d,
    PackedConv2d,
    PackedLayer,
    PackedLinear,
    set_kernel,
)

__all__ = [
    "ModelFactory",
    "attach_runtime_bias_rounding",
    "build_runtime",
    "load",
    "registry_factory",
    "set_submodule",
]

# Builds the architecture from the manifest's record ``{"name": ..., "kwargs": {...}}``
# (``None`` when the artifact records none).
ModelFactory = Callable[[dict[str, Any] | None], nn.Module]


def _submodule(model: nn.Module, name: str, source: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(
            f"{source}: the architecture does not match the artifact: it has no module {name!r}"
        ) from e


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _check_layer(mod: nn.Module, spec: LayerSpec, name: str, source: str) -> None:
    def mismatch(what: str) -> ValueError:
        return ValueError(
            f"{source}: the architecture does not match the artifact: layer {name!r} {what}"
        )

    if not isinstance(mod, kind_named(spec.type).float_type):
        raise mismatch(f"is a {type(mod).__name__}, the artifact has a {spec.type}")
    shape = tuple(mod.weight.shape)
    if shape != spec.weight_shape:
        raise mismatch(f"has weight shape {shape}, the artifact {spec.weight_shape}")
    if (getattr(mod, "bias", None) is not None) != spec.bias:
        raise mismatch("differs in having a bias")
    if spec.conv is not None and conv_params(mod) != spec.conv:
        raise mismatch(f"has conv settings {conv_params(mod)}, the artifact {spec.conv}")


def _make_layer(
    mod: nn.Module, spec: LayerSpec, tensors: dict[str, torch.Tensor], name: str
) -> PackedLayer:
    dims = kind_named(spec.type).spatial_dims
    if dims == 0:
        return PackedLinear(spec, tensors, name)
    cls = {1: PackedConv1d, 2: PackedConv2d}[dims]
    return cls(spec, tensors, name, mod)


@torch.no_grad()
def build_runtime(
    model: nn.Module,
    manifest: Manifest,
    tensors: dict[str, torch.Tensor],
    kernel: str = "float",
    source: str = "artifact",
) -> nn.Module:
    """Turn ``model`` (the architecture, modified in place) into the deploy runtime.

    Quantized layers become packed layers, BatchNorms :class:`ChannelAffine`, and every
    other tensor is loaded from the artifact. Errors are ``ValueError`` naming ``source``.

    Example:
        >>> manifest, tensors = read_artifact(path)  # doctest: +SKIP
        >>> runtime = build_runtime(create_model("resnet18"), manifest, tensors)  # doctest: +SKIP
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    rewrite_modules(model)  # as prepare did, so module names match the artifact's
    # A prepared template carries its own (training) output quantizers; the artifact's
    # frozen ones replace them below.
    remove_output_quantizers(model)
    remove_bias_rounding(model)  # a prepared template's hooks; the runtime's are added below
    for name, spec in manifest.layers.items():
        mod = _submodule(model, name, source)
        _check_layer(mod, spec, name, source)
        set_submodule(model, name, _make_layer(mod, spec, tensors, name))
    for name, bn in manifest.batchnorm.items():
        mod = _submodule(model, name, source)
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm) or mod.num_features != bn.channels:
            raise ValueError(
                f"{source}: the architecture does not match the artifact: {name!r} is "
                f"{type(mod).__name__}, the artifact has a BatchNorm of {bn.channels} channels"
            )
        scale, bias = bn.split(tensors[BATCHNORM_KEY])
        set_submodule(model, name, ChannelAffine(scale.clone(), bias.clone()))
    leftover = [n for n, m in model.named_modules() if isinstance(m, DDQQuantizer)]
    if leftover:
        raise ValueError(
            f"{source}: the architecture does not match the artifact: quantizers "
            f"{leftover[:5]} belong to layers the artifact stores in float; pass the float "
            "architecture (or the model that was exported)"
        )
    replaced = tuple(n + "." for n in [*manifest.layers, *manifest.batchnorm])
    state = model.state_dict()
    wanted = {k for k in state if not k.startswith(replaced)}
    stored = set(manifest.float_tensors)
    if wanted != stored:
        raise ValueError(
            f"{source}: the architecture does not match the artifact: float tensors missing "
            f"from the artifact {sorted(wanted - stored)[:5]}, not in the architecture "
            f"{sorted(stored - wanted)[:5]}"
        )
    for key in manifest.float_tensors:
        target, value = state[key], tensors[key]
        if target.shape != value.shape or target.dtype != value.dtype:
            raise ValueError(
                f"{source}: the architecture does not match the artifact: {key!r} is "
                f"{target.dtype} {tuple(target.shape)} in the model, {value.dtype} "
                f"{tuple(value.shape)} in the artifact"
            )
        target.copy_(value)
    if manifest.outputs:
        parts = manifest.split_outputs(tensors[OUTPUTS_KEY])
        for name, spec in manifest.outputs.items():
            thresholds, levels = parts[name]
            frozen = FrozenActivationQuantizer(spec, thresholds.clone(), levels.clone())
            add_output_quantizer(_submodule(model, name, source), frozen)
    if manifest.conventions.get("integer_bias"):
        attach_runtime_bias_rounding(model)
    if hasattr(model, "ddq_state"):
        del model.ddq_state  # the result is no longer a prepared (trainable) model
    model.ddq_manifest = manifest
    set_kernel(model, kernel)
    return model.eval()


@torch.no_grad()
def _runtime_delta(layer: PackedLayer, affine: ChannelAffine | None) -> torch.Tensor | None:
    """The packed layer's bias rounding (``ddq.conversion.bias_rounding``), from the very
    numbers the prepared model uses, so the runtime reproduces it bit for bit."""
    a = layer.spec.input
    if a is None or a.mode != "uniform" or a.scale is None:
        return None
    w = layer.spec.weight
    step = integer_weight_step(w.mode, w.scale, layer.weight_scale, layer.weight_table)
    bn = None if affine is None else (affine.scale, affine.bias)
    return rounding_delta(layer.bias, bn, step, a.scale)


def attach_runtime_bias_rounding(model: nn.Module) -> dict[str, str]:
    """An ``integer_graph`` artifact's bias rounding on the runtime ``model``: after each
    packed layer's ``ChannelAffine`` (or on the layer); returns ``{target: layer}``.

    Example:
        >>> attach_runtime_bias_rounding(runtime)  # doctest: +SKIP
        {'1': '0'}
    """
    targets = find_bias_targets(
        model,
        lambda m: isinstance(m, PackedLayer),
        lambda m: isinstance(m, ChannelAffine),
        lambda m: isinstance(m, PackedConv),
    )
    for target, (layer, bn) in targets.items():
        packed = model.get_submodule(layer)
        delta = functools.partial(
            _runtime_delta, packed, None if bn is None else model.get_submodule(bn)
        )
        linear = bn is None and not isinstance(packed, PackedConv)
        set_bias_rounding(model.get_submodule(target), delta, linear)
    return {t: layer for t, (layer, _) in targets.items()}


def registry_factory(arch: dict[str, Any] | None) -> nn.Module:
    """The default :data:`ModelFactory`: the model registry (``ddq.models.create_model``).

    Example:
        >>> net = registry_factory({"name": "small_cnn", "kwargs": {"num_classes": 10}})
        >>> type(net).__name__
        'SmallCNN'
    """
    if arch is None:
        raise ValueError(
            "the artifact records no architecture; pass model= (an instance of the "
            "architecture it was exported from) or model_factory="
        )
    from ..models import create_model

    return create_model(arch["name"], **arch.get("kwargs", {}))


def _architecture(manifest: Manifest, factory: ModelFactory | None, source: str) -> nn.Module:
    arch = manifest.architecture
    if arch is None and factory is None:
        raise ValueError(
            f"{source}: the artifact records no architecture; pass model= (an instance of "
            "the architecture it was exported from) or model_factory="
        )
    factory = factory or registry_factory
    try:
        model = factory(None if arch is None else copy.deepcopy(arch))
    except (TypeError, ValueError) as e:
        what = "the recorded architecture" if arch is None else f"the architecture {arch}"
        raise ValueError(f"{source}: cannot build {what}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"{source}: model_factory returned a {type(model).__name__}, not an nn.Module"
        )
    return model


def load(
    path: str | Path,
    model: nn.Module | None = None,
    kernel: str = "float",
    *,
    model_factory: ModelFactory | None = None,
) -> nn.Module:
    """Load a ddq artifact as an executable model (eval mode), without unpickling anything.

    Args:
        path: the file written by ``ddq.export``.
        model: an instance of the architecture (float or prepared; it is copied, not
            modified). The result is on the CPU (``.to(device)`` it).
        kernel: ``"float"`` (decoded weights, fast) or ``"reference"`` (the integer/LUT
            kernels of ``ddq.deploy.kernels``).
        model_factory: builds the architecture when no ``model`` is given; it is called
            with the architecture the manifest records (``{"name": ..., "kwargs": {...}}``,
            or ``None`` when the artifact records none) and returns a fresh ``nn.Module``.
            Default: :func:`registry_factory` (the ddq model registry, imported only then).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: naming the file and the problem (corrupted, truncated, unknown format
            version, manifest/tensor disagreement, architecture mismatch, an architecture
            that cannot be built).

    Example:
        >>> runtime = load("run/model.ddq.safetensors")  # doctest: +SKIP
        >>> runtime = load("run/model.ddq.safetensors",
        ...                model_factory=lambda arch: MyNet(**arch["kwargs"]))  # doctest: +SKIP
        >>> logits = runtime(images)  # doctest: +SKIP
    """
    if model is not None and model_factory is not None:
        raise ValueError("pass model= or model_factory=, not both")
    manifest, tensors = read_artifact(path)
    template: Any = (
        copy.deepcopy(model).cpu()
        if model is not None
        else _architecture(manifest, model_factory, str(path))
    )
    return build_runtime(template, manifest, tensors, kernel=kernel, source=str(path))
