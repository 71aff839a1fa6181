"""``ddq.prepare``: convert any ``nn.Module`` in place to DDQ quantized layers."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..layers import QUANT_LAYERS, QuantLayer, is_depthwise
from ..layers.rewrite import rewrite_modules
from .config import DDQConfig, QuantizerConfig
from .macs import count_macs

__all__ = ["DDQState", "prepare", "state_of"]

# Layers whose parameters stay float by design (folded or tiny), not "unsupported".
_FLOAT_BY_DESIGN = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.PReLU,
)


_UNSUPPORTED = "layer type not supported by ddq"

#: The ``integer_bias`` convention of an ``integer_graph`` model (``bias_rounding.py``).
INTEGER_BIAS = "rounded to the accumulator step s_x * s_w[c] (eval mode)"


@dataclass
class DDQState:
    """What ``prepare`` did, kept on the model as ``model.ddq_state``."""

    config: DDQConfig
    quantized: list[str] = field(default_factory=list)
    float_layers: list[tuple[str, str, str]] = field(default_factory=list)  # name, type, why
    first: str | None = None
    last: str | None = None
    example_shape: tuple[int, ...] | None = None
    # integer_graph: module name -> the quantized layer whose output its quantizer follows
    output_quantizers: dict[str, str] = field(default_factory=dict)

    def conventions(self) -> dict[str, Any]:
        """The disputed conventions, stated for every report."""
        fl = self.config.first_last_bits
        a = self.config.activation
        return {
            "first_layer": self.first,
            "last_layer": self.last,
            "first_last_bits": fl,
            "network_input_quantized": bool(
                self.config.quantize_network_input and a is not None and fl != "float"
            ),
            "weights_signed": self.config.weight.signed,
            "weights_per_channel": self.config.weight.per_channel,
            "activations_signed": "auto (from calibration)"
            if a and a.signed is None
            else (a.signed if a else None),
            "activations_quantized": a is not None,
            "bias_and_batchnorm": "float32 (BatchNorm folds into a per-channel epilogue)",
        } | (
            # integer_graph only, so other artifacts' conventions stay as they were; the
            # loader reads it to round biases as the model does (bias_rounding.py).
            {"integer_bias": INTEGER_BIAS} if self.config.integer_graph else {}
        )


def state_of(model: nn.Module) -> DDQState:
    """The ``DDQState`` of a prepared model."""
    state = getattr(model, "ddq_state", None)
    if not isinstance(state, DDQState):
        raise ValueError("this model was not prepared with ddq.prepare")
    return state


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)


def _override(cfg: QuantizerConfig | None, change: Any, where: str) -> QuantizerConfig | None:
    if change is None:
        return None
    base = cfg or QuantizerConfig(signed=None)
    return base.replace(where, **change)


def _resolve(
    name: str, module: nn.Module, config: DDQConfig, role: str | None
) -> tuple[QuantizerConfig | None, QuantizerConfig | None]:
    """Weight and input quantizer configs for one layer (see ``DDQConfig``)."""
    w, a = config.weight, config.activation
    type_keys = [type(module).__name__] + (["depthwise"] if is_depthwise(module) else [])
    for key in type_keys:
        if key in config.by_type:
            ov = config.by_type[key]
            if "weight" in ov:
                w = _override(w, ov["weight"], f"by_type[{key!r}].weight")
            if "activation" in ov:
                a = _override(a, ov["activation"], f"by_type[{key!r}].activation")
    fl = config.first_last_bits
    if role is not None and isinstance(fl, int):
        w = w and w.replace("first_last_bits", bits=fl, max_bits=max(w.max_bits, fl))
        a = a and a.replace("first_last_bits", bits=fl, max_bits=max(a.max_bits, fl))
    if role == "first" and not config.quantize_network_input:
        a = None
    for pattern, ov in config.by_name.items():
        if _matches(name, pattern):
            if "weight" in ov:
                w = _override(w, ov["weight"], f"by_name[{pattern!r}].weight")
            if "activation" in ov:
                a = _override(a, ov["activation"], f"by_name[{pattern!r}].activation")
    return w, a


def _check_patterns(model: nn.Module, config: DDQConfig) -> None:
    names = [n for n, _ in model.named_modules() if n]
    for pattern in [*config.by_name, *config.skip]:
        if not any(_matches(n, pattern) for n in names):
            raise ValueError(f"override/skip pattern {pattern!r} matches no module in the model")
    present = {type(m).__name__ for m in model.modules()}
    if any(is_depthwise(m) for m in model.modules()):
        present.add("depthwise")
    for key in config.by_type:
        if key not in present:
            raise ValueError(
                f"by_type key {key!r} matches no module type in the model "
                f"(present: {sorted(present)})"
            )


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def prepare(
    model: nn.Module, config: DDQConfig | None = None, example_inputs: Any = None
) -> nn.Module:
    """Convert ``model`` in place: every ``Conv1d``/``Conv2d``/``Linear`` becomes a DDQ layer.

    Weight quantizers are initialised from the weights; input quantizers wait for
    calibration (``ddq.calibrate``) or initialise on the first training batch. Layers that
    cannot be quantized (other parameterised types, subclasses of the supported ones)
    stay float and are listed in ``model.ddq_state.float_layers`` and in ``ddq.summary``.

    Args:
        model: any module; converted in place and returned.
        config: a ``DDQConfig`` (defaults: adaptive 8..2-bit weights and activations,
            first and last layer fixed at 8 bits).
        example_inputs: a tensor or tuple of positional inputs; with it, the first and last
            layers are found in execution order and per-layer MACs are recorded.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
        ...                     nn.Linear(4 * 6 * 6, 10))
        >>> net = prepare(net, example_inputs=torch.zeros(1, 1, 8, 8))
        >>> [row["w_bits"] for row in summary(net)]
        [8, 8]
    """
    if model is None or not isinstance(model, nn.Module):
        raise TypeError(f"prepare expects an nn.Module, got {type(model).__name__}")
    if isinstance(getattr(model, "ddq_state", None), DDQState):
        raise ValueError("this model is already prepared")
    config = config or DDQConfig()
    config.validate()
    # Modules that bypass their Linear/Conv children (attention, transposed Conv1D) first
    # become equivalent modules that call them (see ``rewrite.py``).
    rewrite_modules(model)
    _check_patterns(model, config)

    macs: dict[str, int] = {}
    candidates = [
        n
        for n, m in model.named_modules()
        if type(m) in QUANT_LAYERS and not any(_matches(n, p) for p in config.skip)
    ]
    order = candidates
    if example_inputs is not None:
        macs, executed = count_macs(model, example_inputs)
        order = [n for n in executed if n in candidates]
    state = DDQState(config=config)
    if example_inputs is not None:
        first = example_inputs[0] if isinstance(example_inputs, tuple) else example_inputs
        state.example_shape = tuple(getattr(first, "shape", ()))
    if order:
        state.first, state.last = order[0], order[-1]

    for name, module in list(model.named_modules()):
        if not name and type(module) in QUANT_LAYERS and module is model:
            raise ValueError("prepare needs a container module; wrap a bare layer in nn.Sequential")
        if type(module) in QUANT_LAYERS and name in candidates:
            role = "first" if name == state.first else "last" if name == state.last else None
            if role is not None and config.first_last_bits == "float":
                state.float_layers.append((name, type(module).__name__, "first/last convention"))
                continue
            w_cfg, a_cfg = _resolve(name, module, config, role)
            if w_cfg is None:
                state.float_layers.append((name, type(module).__name__, "weight override None"))
                continue
            w_cfg.validate(f"layer {name!r} weight (after overrides)")
            if a_cfg is not None:
                a_cfg.validate(f"layer {name!r} activation (after overrides)")
            wq = w_cfg.build(channels=module.weight.shape[0], refit_on_bits=True)
            wq.name = f"{name}.weight"
            wq.init_from(module.weight)
            aq = None
            if a_cfg is not None:
                aq = a_cfg.build()
                aq.name = f"{name}.input"
            layer = QUANT_LAYERS[type(module)].from_float(module, wq, aq)
            # A layer the example never reached (GoogLeNet's auxiliary heads run only in
            # training) costs nothing at inference: 0 MACs, not "unknown" (None).
            layer.macs = macs.get(name, 0) if example_inputs is not None else None
            _set_submodule(model, name, layer)
            state.quantized.append(name)
        elif type(module) in QUANT_LAYERS:
            state.float_layers.append((name, type(module).__name__, "skipped by config"))
        elif not isinstance(module, (QuantLayer, *_FLOAT_BY_DESIGN)) and any(
            True for _ in module.parameters(recurse=False)
        ):
            state.float_layers.append((name, type(module).__name__, _UNSUPPORTED))
    if not state.quantized:
        # Nothing was replaced, so the model is unchanged; a 0-layer "quantized" model
        # would train to a budget it trivially meets.
        supported = "/".join(t.__name__ for t in QUANT_LAYERS)
        if not state.float_layers or all(why == _UNSUPPORTED for _, _, why in state.float_layers):
            found = (
                f"; its parameterised layers are of unsupported types "
                f"({sorted({t for _, t, _ in state.float_layers})})"
                if state.float_layers
                else ""
            )
            raise ValueError(
                f"prepare found no layer to quantize: the model ({type(model).__name__}) has "
                f"no {supported} layer{found}"
            )
        why = sorted({f"{n} ({w})" for n, _, w in state.float_layers if w != _UNSUPPORTED})
        raise ValueError(
            f"prepare found no layer to quantize: every {supported} layer is left float by "
            f"the config: {', '.join(why)}"
        )
    if config.integer_graph:
        state.output_quantizers = _attach_output_quantizers(model, config, state)
        # After the output quantizers: the rounding hook is prepended to run before them.
        from .bias_rounding import attach_bias_rounding

        attach_bias_rounding(model)
    model.ddq_state = state
    return model


def _attach_output_quantizers(
    model: nn.Module, config: DDQConfig, state: DDQState
) -> dict[str, str]:
    """``integer_graph``: activation quantizers on the outputs the integer graph needs
    (``output_quantizers.py``), configured as the layer's input quantizer would be, with
    the last layer's fixed bits for the last layer's output."""
    from .output_quantizers import attach_output_quantizers

    def build(layer: str) -> Any:
        a = config.activation
        fl = config.first_last_bits
        if a is None:
            return None
        if layer == state.last and isinstance(fl, int):
            a = a.replace("first_last_bits", bits=fl, max_bits=max(a.max_bits, fl))
        return a.build()

    return attach_output_quantizers(model, build)
