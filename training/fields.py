"""Values written for people and the field checks the configuration classes share.

``parse_count`` / ``format_count`` read and write token counts ('200k', '1.5M'); the checks
raise :class:`saereg.registry.errors.ConfigError` naming the field to fix (non-finite numbers
are refused wherever a number must be positive or not negative); ``id_number`` writes a
number the way SAE ids do.
"""

from __future__ import annotations

import math
import re
from typing import Any

from saereg.registry.errors import ConfigError


def parse_count(value: str | int) -> int:
    """A count written for people: '200k', '1.5M', '2e6', '4096' -> int (k = 1e3, M = 1e6,
    B = 1e9). Raises ValueError for anything else."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(-?[0-9.]+(?:e[0-9]+)?)\s*([kKmMbB]?)\s*", str(value))
    if not m:
        raise ValueError(value)
    mult = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def format_count(n: int) -> str:
    """The inverse of :func:`parse_count` where it is exact: 1000000 -> '1M', 8000 -> '8k'."""
    for mult, suffix in ((1_000_000_000, "B"), (1_000_000, "M"), (1000, "k")):
        if n and n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)


def positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            # by the field's declared type: 0 given for a float field is still a float field
            declared = str(cfg.__dataclass_fields__[name].type)
            what = "a positive finite number" if "float" in declared else "at least 1"
            raise ConfigError(f"{name} must be {what}; got {value}", field=name)


def not_negative(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{name} must be a finite number, not negative; got {value}",
                              field=name)


def one_of(cfg: Any, name: str, allowed: tuple[str, ...], hint: str = "") -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}{hint}",
                          field=name)


def id_number(value: float) -> str:
    """A number as an SAE id writes it: shortest form, "p" for the decimal point (ids name
    folders and torch modules, which refuse dots): 0.05 -> 0p05, 3e-4 -> 0p0003, 16.0 -> 16."""
    return f"{value:g}".replace(".", "p")
