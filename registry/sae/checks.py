"""Checks of an SAE's files that need no torch: its JSON files and its tensors' shapes.

One rule each, used wherever an SAE is read: a folder checked before it is registered (shapes
from the safetensors header), a folder loaded into a module, a foreign layout converted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from saereg.registry.errors import SAEFormatError


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
