"""Checks of an SAE's files that need no torch: its JSON files, its architecture name, its
tensors' shapes and values, and the one rule for a number given from outside (finite).

One rule each, used wherever an SAE is read: a folder checked before it is registered (shapes
from the safetensors header), a folder loaded into a module, a foreign layout converted.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from saereg.registry.errors import ConfigError, InputWarning, SAEFormatError
from saereg.registry.sae.architectures import ARCHITECTURE_ALIASES

LEGACY_ARCHITECTURE = "standard"
"""What a cfg.json without ``architecture`` means: SAELens configs before version 6 had no such
field, and every SAE they described was the standard ReLU SAE."""


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; SAEFormatError if it is unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SAEFormatError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise SAEFormatError(f"{path} is not a JSON object")
    return data


def expected_shapes(architecture: str, d_in: int,
                    d_sae: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The tensors an SAE of ``architecture`` holds (SAELens names), each with the shapes it
    may have, the usual one first: ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_dec``
    [d_in], ``b_enc`` [d_sae] (not gated), ``threshold`` [d_sae] or a scalar (jumprelu), and
    ``b_gate``, ``b_mag``, ``r_mag`` [d_sae] (gated)."""
    shapes = {"W_enc": ((d_in, d_sae),), "W_dec": ((d_sae, d_in),), "b_dec": ((d_in,),)}
    if architecture != "gated":
        shapes["b_enc"] = ((d_sae,),)
    if architecture == "jumprelu":
        shapes["threshold"] = ((d_sae,), ())
    if architecture == "gated":
        shapes.update(b_gate=((d_sae,),), b_mag=((d_sae,),), r_mag=((d_sae,),))
    return shapes


def check_shapes(architecture: str, d_in: int, d_sae: int,
                 shapes: Mapping[str, Sequence[int]], where: str | Path, *,
                 sizes_from: str = "cfg.json") -> None:
    """Refuse tensors that disagree with ``d_in`` and ``d_sae``: every tensor
    :func:`expected_shapes` names must be in ``shapes`` (tensor name -> shape) with one of its
    shapes. ``sizes_from`` says where d_in and d_sae were read, for the message."""
    for name, allowed in expected_shapes(architecture, d_in, d_sae).items():
        if name not in shapes:
            raise SAEFormatError(f"{where} lacks tensor {name} (architecture {architecture})")
        shape = tuple(int(s) for s in shapes[name])
        if shape not in allowed:
            raise SAEFormatError(
                f"{where}: {sizes_from} says d_in={d_in}, d_sae={d_sae} but {name} has shape "
                f"{shape} (expected {allowed[0]})")


def file_architecture(cfg: Mapping[str, Any], where: str | Path, *, warn: bool = True) -> str:
    """The architecture name the cfg.json ``cfg`` (read from ``where``) gives, as written there:
    a key of :data:`ARCHITECTURE_ALIASES` (SAELens's ``standard`` or one of ours).

    A config without ``architecture`` is read as :data:`LEGACY_ARCHITECTURE` (the ReLU SAE of
    SAELens before version 6) and, with ``warn``, says so with an :class:`InputWarning` naming
    the file. An unknown name (or one that is not a string) is a :class:`SAEFormatError` that
    lists the known ones."""
    if "architecture" not in cfg:
        if warn:
            warnings.warn(InputWarning(
                f"{where} has no 'architecture'; reading it as the standard ReLU SAE, as "
                "SAELens configs before version 6 meant"), stacklevel=3)
        return LEGACY_ARCHITECTURE
    arch = cfg["architecture"]
    if not isinstance(arch, str) or arch not in ARCHITECTURE_ALIASES:
        raise SAEFormatError(f"{where}: unknown architecture {arch!r}; known: "
                             f"{', '.join(ARCHITECTURE_ALIASES)}")
    return arch


def refuse_nonfinite(where: str | Path, tensor: str, nan: int, inf: int, doing: str) -> None:
    """Raise the one error for a tensor holding NaN or infinite values (``nan`` and ``inf``
    of them) in the weights file ``where``; ``doing`` is what was refused ("register")."""
    parts = [f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else ""]
    raise SAEFormatError(f"{where}: tensor {tensor} holds {' and '.join(p for p in parts if p)} "
                         f"value{'s' * (nan + inf != 1)}; refusing to {doing} it")


def nonfinite_in_json(value: Any, at: str = "") -> tuple[str, float] | None:
    """The first (key path, value) in parsed JSON ``value`` that is a NaN or infinite float
    (Python's json module reads ``NaN`` and ``Infinity``, which JSON itself does not have), or
    None."""
    if isinstance(value, float) and not math.isfinite(value):
        return at or "(top level)", value
    items = (value.items() if isinstance(value, dict)
             else enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        found = nonfinite_in_json(item, f"{at}.{key}" if at else str(key))
        if found is not None:
            return found
    return None


def finite_number(value: Any, name: str, *, field: str | None = None,
                  minimum: float | None = None, maximum: float | None = None) -> float:
    """``value`` as a float when it is a finite real number (not a bool) within ``minimum``
    .. ``maximum``; otherwise a :class:`ConfigError` whose message starts with ``name`` and
    whose ``field`` (default: ``name``) is the library argument or config field to fix, so that
    the CLI can name the option that sets it. NaN and infinity are refused everywhere a number
    enters (strengths, temperatures, rates, metrics), since JSON cannot store them and every
    comparison with NaN is false."""
    field = name if field is None else field
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise ConfigError(f"{name} must be a number, got {value!r}", field=field)
    try:
        number = float(value)  # a string such as "0.5" too
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {value!r}", field=field) from None
    except OverflowError:  # an int beyond float range
        number = math.inf
    if not math.isfinite(number):
        shown = repr(value) if isinstance(value, str) else str(number)
        raise ConfigError(f"{name} must be a finite number, got {shown}", field=field)
    if minimum is not None and number < minimum or maximum is not None and number > maximum:
        bounds = (f"in {minimum:g}..{maximum:g}" if minimum is not None and maximum is not None
                  else f">= {minimum:g}" if minimum is not None else f"<= {maximum:g}")
        raise ConfigError(f"{name} must be {bounds}, got {number:g}", field=field)
    return number
