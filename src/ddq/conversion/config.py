"""``DDQConfig``: what ``ddq.prepare`` quantizes and how, as typed, round-trippable data."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..quantizer import MODES, DDQQuantizer

__all__ = ["CONFIG_VERSION", "DDQConfig", "QuantizerConfig"]

CONFIG_VERSION = 1


@dataclass
class QuantizerConfig:
    """Settings of one ``DDQQuantizer``.

    Args:
        max_bits: largest bitwidth ``K`` (1..8); layers start there.
        min_bits: floor ``b_min`` that the bitwidth never goes below.
        mode: ``"adaptive"`` (index + table) or ``"uniform"`` (integer grid).
        signed: ``True``/``False``, or ``None`` to decide from calibration data.
        grad_scale: LSQ-style scaling of the level gradient.
        bits: a fixed bitwidth (gates frozen), or ``None`` to learn it.
        per_channel: weights only: one scale per output channel (axis 0) times one table
            per layer (bits stay per layer). Activations must be per-tensor.
        level_grid: adaptive mode: train the levels on the symmetric signed integer grid
            of this many bits (2..8), ``round(top * level / L) * L / top`` with
            ``top = 2**(n-1) - 1`` and ``L`` the largest ``|level|``, straight-through
            (``ddq.quantizer.snap_to_grid``); ``8`` makes the int8 export of adaptive
            weights (``ddq.deploy.int8_codes``) exact. ``None``: free levels. Uniform
            levels are an integer grid already and ignore it, so one setting can serve a
            configuration whose overrides switch some layers to uniform.

    Example:
        >>> QuantizerConfig(max_bits=4, mode="uniform").build().bits
        4
    """

    max_bits: int = 8
    min_bits: int = 2
    mode: str = "adaptive"
    signed: bool | None = True
    grad_scale: bool = True
    bits: int | None = None
    per_channel: bool = False
    level_grid: int | None = None

    def validate(self, where: str = "quantizer") -> None:
        """Raise ``ValueError`` naming ``where`` and the bad field."""
        for f in dataclasses.fields(self):
            _check_field(f.name, getattr(self, f.name), where)
        if self.min_bits > self.max_bits:
            raise ValueError(
                f"{where}: min_bits must be an integer in 1..max_bits ({self.max_bits}), "
                f"got {self.min_bits!r}"
            )
        if self.bits is not None and self.bits > self.max_bits:
            raise ValueError(
                f"{where}: bits must be None or an integer in 1..max_bits ({self.max_bits}), "
                f"got {self.bits!r}"
            )

    def build(self, channels: int | None = None, refit_on_bits: bool = False) -> DDQQuantizer:
        """A new quantizer with these settings.

        ``channels``: the weight's output channels, used when ``per_channel`` is set.
        ``refit_on_bits``: re-fit the levels to the input when the bitwidth changes (weights).
        """
        self.validate()
        q = DDQQuantizer(
            max_bits=self.max_bits,
            min_bits=min(self.min_bits, self.bits or self.min_bits),
            mode=self.mode,  # type: ignore[arg-type]
            signed=self.signed,
            grad_scale=self.grad_scale,
            channels=channels if self.per_channel else None,
            refit_on_bits=refit_on_bits,
            # Ignored in uniform mode (see the class docstring); DDQQuantizer would refuse it.
            level_grid=self.level_grid if self.mode == "adaptive" else None,
        )
        if self.bits is not None:
            q.set_bits(self.bits, trainable=False)
        return q

    def replace(self, where: str, **changes: Any) -> QuantizerConfig:
        """A copy with ``changes``; unknown field names raise ``ValueError``."""
        _check_settings(changes, where)
        return dataclasses.replace(self, **changes)


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_field(key: str, value: Any, where: str) -> None:
    """Type and range of one ``QuantizerConfig`` field on its own; ``ValueError`` naming it.

    Cross-field rules (``min_bits <= max_bits``, ``bits <= max_bits``) are checked by
    ``QuantizerConfig.validate`` once the settings are combined.
    """
    if key in ("max_bits", "min_bits"):
        if not _is_int(value) or not 1 <= value <= 8:
            raise ValueError(f"{where}: {key} must be an integer in 1..8, got {value!r}")
    elif key == "bits":
        if value is not None and (not _is_int(value) or not 1 <= value <= 8):
            raise ValueError(f"{where}: bits must be null or an integer in 1..8, got {value!r}")
    elif key == "level_grid":
        if value is not None and (not _is_int(value) or not 2 <= value <= 8):
            raise ValueError(
                f"{where}: level_grid must be null or an integer in 2..8, got {value!r}"
            )
    elif key == "mode":
        if not isinstance(value, str) or value not in MODES:
            raise ValueError(f"{where}: unknown mode {value!r}; expected one of {MODES}")
    elif key in ("grad_scale", "per_channel"):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {key} must be true or false, got {value!r}")
    elif key == "signed":
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{where}: signed must be true, false or null, got {value!r}")
    else:
        names = sorted(f.name for f in dataclasses.fields(QuantizerConfig))
        raise ValueError(f"{where}: unknown quantizer setting {key!r}; known: {names}")


def _check_settings(settings: Any, where: str) -> None:
    """``settings`` is a mapping of known quantizer fields, each of a valid type."""
    if not isinstance(settings, Mapping):
        raise ValueError(
            f"{where} must be a mapping of quantizer settings, got {type(settings).__name__} "
            f"{settings!r}"
        )
    names = {f.name for f in dataclasses.fields(QuantizerConfig)}
    bad_keys = [k for k in settings if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"{where}: setting names must be strings, got {bad_keys!r}")
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ValueError(f"{where}: unknown quantizer setting(s) {unknown}; known: {sorted(names)}")
    for key, value in settings.items():
        _check_field(key, value, where)


@dataclass
class DDQConfig:
    """How ``ddq.prepare`` converts a model.

    Resolution order for a layer: the defaults ``weight``/``activation``; then
    ``by_type`` (keys are float layer class names such as ``"Conv2d"``, or
    ``"depthwise"``); then the first/last-layer convention; then ``by_name`` (glob patterns
    on module names, e.g. ``"features.*.conv.1.0"``). An override is a dict
    ``{"weight": {...}, "activation": {...} or None}``; ``None`` keeps that tensor float.
    Every pattern and type key must match at least one module.

    Args:
        weight: default weight quantizer.
        activation: default input-activation quantizer, or ``None`` for float activations.
        by_type: overrides by layer type.
        by_name: overrides by module-name glob pattern.
        skip: glob patterns of modules to leave in floating point.
        first_last_bits: the convention for the first conv/linear (in execution order) and
            the last one: an int fixes their weight and input bits there (default 8);
            ``"learn"`` treats them like any layer; ``"float"`` leaves them unquantized.
        quantize_network_input: quantize the input of the first layer (the image itself).
        integer_graph: also quantize the outputs that reach a residual add, a
            concatenation, a pooling, a flatten or the model output straight from a
            quantized layer (through BatchNorm and activations), so that an exported graph
            runs every conv and matrix product as an integer kernel
            (``ddq.conversion.output_quantizers``; needs ``activation``). Off by default:
            it pays only for uniform activations exported to an integer runtime, and
            artifact format versions 1 and 2 cannot hold these quantizers.

    Example:
        >>> cfg = DDQConfig(by_type={"depthwise": {"weight": {"min_bits": 4}}})
        >>> DDQConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    weight: QuantizerConfig = field(
        default_factory=lambda: QuantizerConfig(signed=True, per_channel=True)
    )
    activation: QuantizerConfig | None = field(default_factory=lambda: QuantizerConfig(signed=None))
    by_type: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_name: dict[str, dict[str, Any]] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)
    first_last_bits: int | str = 8
    quantize_network_input: bool = True
    integer_graph: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad key and saying what is wrong."""
        if not isinstance(self.weight, QuantizerConfig):
            raise ValueError(
                f"DDQConfig.weight must be a QuantizerConfig, got {type(self.weight).__name__}"
            )
        self.weight.validate("DDQConfig.weight")
        if self.activation is not None:
            if not isinstance(self.activation, QuantizerConfig):
                raise ValueError(
                    "DDQConfig.activation must be a QuantizerConfig or None, got "
                    f"{type(self.activation).__name__}"
                )
            self.activation.validate("DDQConfig.activation")
            if self.activation.per_channel:
                raise ValueError("DDQConfig.activation: per_channel is for weights only")
        fl = self.first_last_bits
        if not (
            (isinstance(fl, str) and fl in ("learn", "float")) or (_is_int(fl) and 1 <= fl <= 8)
        ):
            raise ValueError(
                f"first_last_bits must be an integer in 1..8, 'learn' or 'float', got {fl!r}"
            )
        if not isinstance(self.integer_graph, bool):
            raise ValueError(f"integer_graph must be true or false, got {self.integer_graph!r}")
        if not isinstance(self.quantize_network_input, bool):
            raise ValueError(
                f"quantize_network_input must be true or false, got {self.quantize_network_input!r}"
            )
        if not isinstance(self.skip, list | tuple) or not all(
            isinstance(p, str) for p in self.skip
        ):
            raise ValueError(
                f"skip must be a list of module-name patterns (strings), got {self.skip!r}"
            )
        for table_name, table in (("by_type", self.by_type), ("by_name", self.by_name)):
            if not isinstance(table, Mapping):
                raise ValueError(
                    f"{table_name} must be a mapping of overrides, got {type(table).__name__} "
                    f"{table!r}"
                )
            for key, override in table.items():
                if not isinstance(key, str):
                    raise ValueError(
                        f"{table_name} keys must be strings "
                        f"({'layer type names' if table_name == 'by_type' else 'glob patterns'})"
                        f", got {key!r}"
                    )
                if not isinstance(override, Mapping) or set(override) - {"weight", "activation"}:
                    raise ValueError(
                        f"{table_name}[{key!r}] must be a dict with keys 'weight' and/or "
                        f"'activation', got {override!r}"
                    )
                for role, settings in override.items():
                    if settings is None:
                        continue  # that tensor stays float
                    _check_settings(settings, f"{table_name}[{key!r}].{role}")
                act = override.get("activation")
                if isinstance(act, Mapping) and act.get("per_channel"):
                    raise ValueError(
                        f"{table_name}[{key!r}].activation: per_channel is for weights only"
                    )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-ready) with a format version."""
        d = dataclasses.asdict(self)
        d["version"] = CONFIG_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DDQConfig:
        """Inverse of ``to_dict``; unknown keys or versions raise ``ValueError``."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a DDQConfig must be a mapping of settings, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ValueError(
                f"DDQConfig version {version} is not supported (expected {CONFIG_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names, key=repr)
        if unknown:
            raise ValueError(f"unknown DDQConfig key(s) {unknown}; known: {sorted(names)}")
        if "weight" in d:
            _check_settings(d["weight"], "DDQConfig.weight")
            d["weight"] = QuantizerConfig(per_channel=True).replace(
                "DDQConfig.weight", **d["weight"]
            )
        if d.get("activation") is not None:
            _check_settings(d["activation"], "DDQConfig.activation")
            d["activation"] = QuantizerConfig(signed=None).replace(
                "DDQConfig.activation", **d["activation"]
            )
        cfg = cls(**d)
        cfg.validate()
        return cfg
