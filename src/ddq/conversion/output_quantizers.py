"""Output quantizers: the activation quantizers an all-integer inference graph needs.

A quantized layer only quantizes its *input*. A conv whose output (after its BatchNorm
and activation) feeds another quantized layer is therefore followed by a quantizer (that
layer's input quantizer), and an integer runtime fuses ``DQ(x), DQ(w) -> Conv -> Q(y)``
into one integer kernel. A conv whose output feeds a residual add, a concatenation, a
pooling, a flatten or the model's output is followed by no quantizer, and ONNX Runtime
then leaves it in floating point (``docs/deploy.md``, "The integer graph").

:func:`attach_output_quantizers` (called by ``ddq.prepare`` when
``DDQConfig.integer_graph`` is set) finds those tensors with ``torch.fx`` symbolic tracing
and puts an activation :class:`~ddq.quantizer.DDQQuantizer` on each, so that what the
exported graph quantizes is exactly what training quantized:

* from every quantized layer, follow its output through BatchNorms and elementwise
  activations (while each tensor has a single user);
* if the tensor reached has a user that is not a quantized layer with an input quantizer,
  quantize it: the quantizer becomes the child ``ddq_output_quantizer`` of the last module
  of that chain (the BatchNorm, the activation module, or the layer itself) and a forward
  hook applies it to that module's output. Elementwise *functions* after that module
  (``F.relu``) then act on the quantized tensor, as the exported graph does.

The user's parameters and buffers keep their state-dict keys (the quantizer adds its own
under ``<module>.ddq_output_quantizer.``). Calibration, the optimizer, the budget's
``max_act_bits`` cap and the export treat these quantizers like the input quantizers. A
model that ``torch.fx`` cannot trace keeps working: a warning is logged and its graph
stays partly float.

Example:
    >>> net = torchvision.models.resnet18(num_classes=10)  # doctest: +SKIP
    >>> ddq.prepare(net, ddq.DDQConfig(integer_graph=True), example_inputs=x)  # doctest: +SKIP
    >>> sorted(output_quantizers(net))[:2]  # doctest: +SKIP
    ['fc', 'layer1.0.bn2']
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import QuantLayer
from ..quantizer import DDQQuantizer
from .tracing import CountingTracer

__all__ = [
    "OUTPUT_QUANTIZER",
    "OutputPoint",
    "add_output_quantizer",
    "attach_output_quantizers",
    "find_output_points",
    "output_quantizers",
    "remove_output_quantizers",
]

log = logging.getLogger(__name__)

#: The attribute (child module) name of an output quantizer on the module it follows.
OUTPUT_QUANTIZER = "ddq_output_quantizer"

# Elementwise modules and functions a conv's output may pass through before it is used:
# quantizing before or after them is the same tensor for the fusion (ONNX Runtime moves
# ReLU/Clip onto the codes or drops them).
_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.GELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.hardtanh,
    F.leaky_relu,
    F.silu,
    F.hardswish,
    F.gelu,
    F.dropout,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_"}


def _quantize_output(module: nn.Module, args: Any, output: Any) -> Any:
    """The forward hook: the module's output through its output quantizer."""
    q = module._modules.get(OUTPUT_QUANTIZER)
    if q is None or not isinstance(output, torch.Tensor):
        return output
    if isinstance(module, QuantLayer) and not module.quantize:
        return output  # the layer computes as the float layer
    y = q(output)
    # The quantizer's autograd function may return a view, and models add into their
    # residual branch in place (torchvision's ``out += identity``), which autograd
    # forbids on such a view.
    return y.clone() if y._is_view() else y


def add_output_quantizer(module: nn.Module, quantizer: nn.Module) -> None:
    """Quantize ``module``'s output with ``quantizer`` (a child module plus a forward hook).

    Also used by the loader and the ONNX export with frozen quantizers.

    Example:
        >>> relu = nn.ReLU()
        >>> add_output_quantizer(relu, nn.Identity())
        >>> hasattr(relu, OUTPUT_QUANTIZER)
        True
    """
    setattr(module, OUTPUT_QUANTIZER, quantizer)
    if _quantize_output not in module._forward_hooks.values():
        module.register_forward_hook(_quantize_output)


def remove_output_quantizers(model: nn.Module) -> int:
    """Remove every output quantizer and its hook from ``model``; returns how many.

    Example:
        >>> net = nn.Sequential(nn.ReLU()); add_output_quantizer(net[0], nn.Identity())
        >>> remove_output_quantizers(net)
        1
    """
    removed = 0
    for m in model.modules():
        for key, fn in list(m._forward_hooks.items()):
            if fn is _quantize_output:
                del m._forward_hooks[key]
        if OUTPUT_QUANTIZER in m._modules:
            del m._modules[OUTPUT_QUANTIZER]
            removed += 1
    return removed


def output_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> its output quantizer, in module order.

    Example:
        >>> output_quantizers(nn.Sequential(nn.ReLU()))
        {}
    """
    return {
        name: m._modules[OUTPUT_QUANTIZER]
        for name, m in model.named_modules()
        if m._modules.get(OUTPUT_QUANTIZER) is not None
    }


def _is_elementwise(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _ELEMENTWISE_MODULES)
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_METHODS
    return False


def _quantizes_input(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    m = modules.get(str(node.target)) if node.op == "call_module" else None
    return isinstance(m, QuantLayer) and m.quantize and m.input_quantizer is not None


_MERGES = {operator.add, operator.iadd, torch.add, torch.cat, torch.concat}
_MERGE_METHODS = {"add", "add_"}
_POOLS = (nn.MaxPool1d, nn.MaxPool2d)


@dataclass(frozen=True)
class OutputPoint:
    """A tensor the integer graph needs quantized: the output of module ``target``.

    ``source``: the quantized layer, or the merge (add/concatenation) or max-pool node,
    whose result it is (through BatchNorm and elementwise activations). ``share``: the
    quantized layers that also read it; they use the new quantizer as their input
    quantizer (one grid for the tensor, so the exported graph has one ``QuantizeLinear``
    and no requantization). ``same_as``: for a max-pool whose input is quantized at that
    point, the same quantizer (max-pooling values on a grid leaves them on it, so the
    integer runtime pools the codes).
    """

    source: str
    share: tuple[str, ...] = ()
    same_as: str | None = None  # a max-pool's output: its input's quantizer (no requantize)


def _is_source(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """A name for ``node`` if its result must reach an integer consumer quantized."""
    if node.op == "call_module":
        m = modules.get(str(node.target))
        if (isinstance(m, QuantLayer) and m.quantize) or isinstance(m, _POOLS):
            return str(node.target)
        return None
    if (node.op == "call_function" and node.target in _MERGES) or (
        node.op == "call_method" and node.target in _MERGE_METHODS
    ):
        return node.name
    return None


def _stack(node: torch.fx.Node) -> list[str]:
    """The module paths enclosing ``node``, outermost first."""
    return [
        v[0] if isinstance(v, tuple) else str(v)
        for v in node.meta.get("nn_module_stack", {}).values()
    ]


def _returning_module(
    node: torch.fx.Node, graph: torch.fx.Graph, calls: dict[str, int]
) -> str | None:
    """The innermost module called once whose forward returns ``node``'s value (and
    nothing else leaves it), else None."""
    if node.op == "call_module" and calls.get(str(node.target), 0) == 1:
        return str(node.target)
    for path in reversed(_stack(node)):
        if not path or calls.get(path, 0) != 1:
            continue
        leaving = [
            n
            for n in graph.nodes
            if path in _stack(n) and any(path not in _stack(u) for u in n.users)
        ]
        if leaving == [node]:
            return path
    return None


def find_output_points(model: nn.Module) -> tuple[dict[str, OutputPoint], str | None]:
    """Where an integer graph needs a quantizer the model lacks.

    Returns ``({module name: OutputPoint}, None)``, or ``({}, reason)`` when the model
    cannot be traced. A tensor that no module returns alone (a shared ``ReLU`` module's
    output inside a larger module that returns more) cannot carry a hook; such points are
    skipped with a warning.

    Example:
        >>> find_output_points(prepared_resnet18)  # doctest: +SKIP
        ({'relu': OutputPoint(source='conv1'), 'layer1.0': OutputPoint(source='add', ...
    """
    # Quantized layers' and quantizers' insides are not graph structure.
    tracer = CountingTracer(lambda m: isinstance(m, QuantLayer | DDQQuantizer))
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many types for untraceable control flow
        return {}, f"{type(e).__name__}: {e}"
    modules = dict(model.named_modules())
    calls = tracer.calls
    points: dict[str, OutputPoint] = {}
    at: dict[torch.fx.Node, str] = {}  # the quantized tensors found so far -> their point
    for node in graph.nodes:
        source = _is_source(node, modules)
        if source is None:
            continue
        end = node
        while len(end.users) == 1:
            (user,) = end.users
            is_bn = user.op == "call_module" and isinstance(
                modules.get(str(user.target)), nn.modules.batchnorm._BatchNorm
            )
            if not (is_bn or _is_elementwise(user, modules)):
                break
            end = user
        readers = [u for u in end.users if _quantizes_input(u, modules)]
        if len(end.users) == 1 and readers:
            continue  # the next layer's input quantizer already quantizes it
        # Several readers, all quantized layers (a block output read by a conv and a
        # downsample conv) still get one quantizer: one QuantizeLinear whose codes every
        # reader uses, or ONNX Runtime keeps a float ReLU and float Add before them.
        target = _returning_module(end, graph, calls)
        if target is None and end is not node:
            # Quantize before the trailing elementwise functions instead (F.relu after a
            # BatchNorm): the same grid for the fusion, and exact in training and export.
            prev = end
            while prev is not node and _returning_module(prev, graph, calls) is None:
                prev = prev.args[0] if isinstance(prev.args[0], torch.fx.Node) else node
            target = _returning_module(prev, graph, calls) if prev is not end else None
            readers = []  # the readers see the tensor after the elementwise functions
        if target is None:
            log.warning(
                "integer_graph: the result of %r needs a quantizer, but no module called once "
                "returns it; it stays float in the exported graph",
                source,
            )
            continue
        if target in points:
            continue
        share = tuple(str(u.target) for u in readers)
        same_as = None
        if isinstance(modules.get(source), _POOLS) and isinstance(node.args[0], torch.fx.Node):
            same_as = at.get(node.args[0])
        points[target] = OutputPoint(source, share, same_as)
        at[end] = target
    return points, None


def attach_output_quantizers(model: nn.Module, build: Any) -> dict[str, str]:
    """Add an output quantizer where :func:`find_output_points` says one is needed.

    Where quantized layers also read the tensor, the first one's input quantizer becomes
    the tensor's quantizer and every such layer's input quantizer (one shared module, so
    a layer re-quantizes values already on its grid: the identity).

    Args:
        model: a model whose layers ``ddq.prepare`` has just converted.
        build: ``build(source) -> DDQQuantizer | None``: a new quantizer for the result of
            ``source`` (a quantized layer's name, or a merge/pool node's); ``None``: leave
            it float.

    Returns:
        ``{module name: source}`` for every quantizer added.

    Example:
        >>> attach_output_quantizers(net, lambda source: cfg.build())  # doctest: +SKIP
    """
    points, failure = find_output_points(model)
    if failure is not None:
        log.warning(
            "integer_graph: torch.fx cannot trace %s (%s); no output quantizers were added, so "
            "convs that feed adds, concatenations or pooling stay float in an exported graph",
            type(model).__name__,
            failure,
        )
        return {}
    added: dict[str, str] = {}
    for name, point in points.items():
        readers = [model.get_submodule(n) for n in point.share]
        if point.same_as is not None and point.same_as in added:
            q = getattr(model.get_submodule(point.same_as), OUTPUT_QUANTIZER)
            for r in readers:
                r.input_quantizer = q
        elif readers:
            q = readers[0].input_quantizer
            for r in readers[1:]:
                r.input_quantizer = q
        else:
            q = build(point.source)
            if q is None:
                continue
            q.name = f"{name}.output"
        add_output_quantizer(model.get_submodule(name), q)
        added[name] = point.source
    return added
