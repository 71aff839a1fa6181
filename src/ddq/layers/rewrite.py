"""Module rewrites: float modules whose forward bypasses ``Conv``/``Linear`` modules are
replaced by equivalent float modules that call them, so that ``prepare`` can quantize them.

Examples: ``nn.MultiheadAttention`` multiplies by ``in_proj_weight`` directly; torchvision's
Swin attention calls ``F.linear`` on its ``qkv`` weight; ``transformers``' GPT-2 ``Conv1D``
is a linear layer with its weight stored transposed. A rewrite turns each into a module
built from ``nn.Linear``/``nn.Conv*`` children, numerically the same in float.

``prepare`` applies every registered rewrite before it replaces layers, and ``ddq.load``
applies them to the architecture it builds, so the artifact and the architecture agree.
A rewrite is registered by the module that defines the replacement
(:func:`register_rewrite`); rewritten modules must not match any rewrite again.

Example:
    >>> from torch import nn
    >>> class Twice(nn.Module):
    ...     def forward(self, x): return 2 * x
    >>> register_rewrite("doc-example", lambda m: type(m) is Twice, lambda m: nn.Identity())
    >>> net = nn.Sequential(Twice())
    >>> rewrite_modules(net)
    ['0']
    >>> unregister_rewrite("doc-example")
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["Rewrite", "register_rewrite", "rewrite_modules", "unregister_rewrite"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rewrite:
    """One rewrite: ``matches(module)`` says whether ``build(module)`` replaces it.

    ``build`` returns the replacement; it may share the original's parameters or copy
    them (a copy changes the parameter objects, so build optimizers after ``prepare``).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    build: Callable[[nn.Module], nn.Module]


_REWRITES: dict[str, Rewrite] = {}


def register_rewrite(
    name: str, matches: Callable[[nn.Module], bool], build: Callable[[nn.Module], nn.Module]
) -> None:
    """Register (or replace) the rewrite called ``name``."""
    _REWRITES[name] = Rewrite(name, matches, build)


def unregister_rewrite(name: str) -> None:
    """Remove the rewrite called ``name`` (no error when absent)."""
    _REWRITES.pop(name, None)


def _load_builtin_rewrites() -> None:
    # ``attention.py`` and ``hf_conv1d.py`` register their rewrites when ``ddq.layers`` is
    # imported; importing it here makes sure they are in before any rewrite runs.
    from .. import layers  # noqa: F401


def rewrite_modules(model: nn.Module) -> list[str]:
    """Replace, in place, every submodule that a registered rewrite matches.

    Returns the names of the replaced modules, outermost first. The root module itself is
    never replaced (wrap it in a container).
    """
    _load_builtin_rewrites()
    done: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(d + ".") for d in done):
            continue
        for rw in _REWRITES.values():
            if rw.matches(module):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, rw.build(module))
                logger.debug("rewrote %s (%s) with %r", name, type(module).__name__, rw.name)
                done.append(name)
                break
    return done
