"""Read run settings from a YAML or JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_settings"]


def read_settings(path: str | Path) -> dict[str, Any]:
    """A dict of settings from ``.yaml``/``.yml`` (needs PyYAML) or ``.json``.

    Example:
        >>> read_settings("examples/mnv2_w4a4.yaml")["budget"]  # doctest: +SKIP
        {'avg_weight_bits': 4.0, 'max_act_bits': 4}
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise ValueError(f"cannot parse config file {p}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping of settings")
    return data
