"""Published SAE layouts (the repos SAELens's release table names): which files each needs,
the conversion of those files to this project's module (the converters, and the facts of each
layout, live in :mod:`saereg.registry.sae.published_layouts`), and the check that a converted
SAE encodes as its layout defines (:func:`check_encodes`: the layout's reference encoder, on
its raw tensors, against the module, on random inputs).

Nothing is unpickled: ``torch.load`` runs with ``weights_only=True``; npz without pickles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saereg.registry.errors import SAEFormatError

# files of each layout: (required, optional), relative to the SAE's path in the repo ("" is the
# path itself, a file); "{stem}" is that file's name without its .pt suffix
FILES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "saelens": (("cfg.json", "sae_weights.safetensors"), ("sparsity.safetensors",)),
    "gemmascope": (("params.npz",), ()),
    "gemmascope2": (("params.safetensors",), ("config.json",)),
    "llamascope": (("hyperparams.json", "checkpoints/final.safetensors"), ()),
    "llamascope-r1": (("config.json", "sae_weights.safetensors"), ()),
    "dictionary_learning": (("ae.pt", "config.json"), ()),
    "qwenscope": (("",), ()),
    "sparsify": (("cfg.json", "sae.safetensors"), ()),
    "goodfire": (("",), ()),
    "deepseek-r1": (("",), ()),
    "hook-z-kk": (("", "../{stem}_cfg.json"), ()),
}


def repo_files(layout: str, path: str) -> tuple[list[str], list[str]]:
    """The repo paths of the files an SAE at ``path`` (a folder or a file) in ``layout``
    needs, and those it may have."""
    path = path.strip("/")
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    stem = path.rsplit("/", 1)[-1].split(".pt")[0]

    def one(name: str) -> str:
        if name == "":
            return path
        if name.startswith("../"):
            name = name[3:].format(stem=stem)
            return f"{parent}/{name}" if parent else name
        return f"{path}/{name}" if path else name

    required, optional = FILES[layout]
    return [one(n) for n in required], [one(n) for n in optional]


@dataclass
class Converted:
    """A converted SAE (this project's module, normalisation not yet folded), the layout's own
    encode on its raw tensors (float32 in, float32 out), and what the files say about it."""

    sae: Any
    reference: Callable[[Any], Any]
    facts: dict[str, Any] = field(default_factory=dict)


def convert(layout: str, local: Path, *, meta: dict, repo: str,
            norm_scaling_factor: float | None = None) -> Converted:
    """Convert the SAE at ``local`` (its folder, or its file for one-file layouts)."""
    from saereg.registry.sae import published_layouts as layouts

    if layout == "qwenscope":
        return layouts.qwenscope(local, meta, norm_scaling_factor, repo=repo)
    return layouts.CONVERTERS[layout](local, meta, norm_scaling_factor)


SCALES = (1.0, 8.0, 64.0, 512.0)
"""Input scales tried, smallest first, until some latent fires under the reference."""


def check_encodes(conv: Converted, where: str, *, n: int = 16, seed: int = 0) -> float:
    """Encode ``n`` random inputs with the converted module and with the layout's reference
    encoder; SAEFormatError naming ``where`` if they differ. Inputs are N(0, 1) times the first
    of :data:`SCALES` at which some latent fires (published thresholds are in the units of real
    activations). An entry differs when it is off by more than 1e-4 of the largest activation;
    up to one entry in 1,000 may (a pre-activation within rounding of a JumpReLU threshold or
    of the k-th largest value flips either way), where a wrong conversion (a transpose, a
    scale, a bias) moves nearly all of them. Returns the fraction of entries that differ."""
    import copy

    import torch

    sae = conv.sae if conv.sae.W_enc.dtype == torch.float32 else copy.deepcopy(conv.sae).float()
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, sae.cfg.d_in, generator=g)
    for scale in SCALES:
        x = base * scale
        with torch.no_grad():
            mine = sae.encode(x)
            theirs = conv.reference(x).float()
        if mine.shape != theirs.shape:
            raise SAEFormatError(f"{where}: the converted SAE encodes to {tuple(mine.shape)}, "
                                 f"its layout to {tuple(theirs.shape)}; nothing was kept")
        if not bool(torch.isfinite(mine).all()):
            raise SAEFormatError(f"{where}: the converted SAE encodes to non-finite values; "
                                 "nothing was kept")
        bound = 1e-4 * max(1.0, float(theirs.abs().max()))
        off = int(((mine - theirs).abs() > bound).sum())
        if off > mine.numel() // 1000:
            raise SAEFormatError(f"{where}: the converted SAE does not encode as its layout "
                                 f"defines ({off} of {mine.numel()} activations differ on "
                                 f"random inputs); nothing was kept")
        if bool((theirs != 0).any()):
            break
    return off / max(1, mine.numel())
