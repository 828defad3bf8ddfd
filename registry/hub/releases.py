"""The release table: the published SAEs that SAELens names (its ``pretrained_saes.yaml``).

The table is read as data, without importing sae_lens: from the file (or the folder holding
``pretrained_saes.yaml``) that ``SAEREG_RELEASES`` or the ``table`` argument names, otherwise
from the installed sae-lens package's own copy, found by its import location (the package
itself is never executed). Each release has a Hub repo, a model, a conversion (SAELens's
``conversion_func``: how the repo lays out its SAEs) and its SAEs, each with an id, a path in
the repo, and when given an L0, a Neuronpedia id and a norm scaling factor.

:func:`layout` names the layout an SAE is stored in (``saelens``, ``gemmascope``, ...); the
layouts this project converts are :data:`SUPPORTED`, and :data:`REFUSED` says why the others
are not SAEs its architectures represent.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saereg.registry.errors import NotFoundError, SAEFormatError, SaeRegError, UsageError

ENV = "SAEREG_RELEASES"
TABLE_FILE = "pretrained_saes.yaml"
INSTALL_HINT = ("install sae-lens to read the release table it ships: "
                "pip install 'sae-registry[compat]' (or pip install sae-lens), or point "
                f"{ENV} at a pretrained_saes.yaml")

LAYOUTS = {None: "saelens", "sae_lens": "saelens", "gemma_2": "gemmascope",
           "gemma_3": "gemmascope2", "llama_scope": "llamascope",
           "llama_scope_r1_distill": "llamascope-r1", "dictionary_learning_1":
           "dictionary_learning", "qwen_scope": "qwenscope", "sparsify": "sparsify",
           "goodfire": "goodfire", "deepseek_r1": "deepseek-r1",
           "connor_rob_hook_z": "hook-z-kk", "gemma_2_transcoder": "gemmascope-transcoder",
           "mwhanna_transcoder": "mwhanna-transcoder",
           "mntss_clt_layer_transcoder": "clt-transcoder", "temporal": "temporal"}
"""SAELens's conversion names -> this project's layout names."""
SUPPORTED = ("saelens", "gemmascope", "gemmascope2", "llamascope", "llamascope-r1",
             "dictionary_learning", "qwenscope", "sparsify", "goodfire", "deepseek-r1",
             "hook-z-kk")
_TRANSCODER = ("a transcoder: it reads one hook and writes another, and this project's SAEs "
               "reconstruct the hook they read")
REFUSED = {"gemmascope-transcoder": _TRANSCODER, "gemmascope2-transcoder": _TRANSCODER,
           "mwhanna-transcoder": _TRANSCODER, "clt-transcoder": _TRANSCODER,
           "temporal": "a temporal SAE: its encoder attends over earlier tokens, which no "
                       "architecture here does"}


@dataclass(frozen=True)
class ReleaseSAE:
    """One SAE of a release, as the table lists it."""

    id: str
    path: str
    l0: float | None = None
    neuronpedia: str | None = None
    norm_scaling_factor: float | None = None
    variance_explained: float | None = None
    conversion: str | None = None
    """SAELens's conversion for this SAE (the release's, unless the entry overrides it)."""


@dataclass(frozen=True)
class Release:
    name: str
    repo: str
    model: str
    conversion: str | None
    saes: tuple[ReleaseSAE, ...] = field(default=())

    def sae(self, sae_id: str) -> ReleaseSAE:
        for entry in self.saes:
            if entry.id == sae_id:
                return entry
        raise NotFoundError("SAE id", sae_id, known=[e.id for e in self.saes],
                            hint=f"of release {self.name}; see `saereg releases --search "
                            f"{self.name}`")


def table_path(table: str | os.PathLike | None = None) -> Path:
    """The release table file: ``table``, else ``$SAEREG_RELEASES``, else sae-lens's copy (a
    folder stands for the ``pretrained_saes.yaml`` in it)."""
    given = table if table is not None else os.environ.get(ENV) or None
    if given is not None:
        p = Path(given).expanduser()
        p = p / TABLE_FILE if p.is_dir() else p
        if not p.is_file():
            raise UsageError(f"release table {p} does not exist (from "
                             f"{'the table argument' if table is not None else ENV})")
        return p
    import importlib.util

    try:
        spec = importlib.util.find_spec("sae_lens")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / TABLE_FILE).is_file():
            return Path(folder) / TABLE_FILE
    raise SaeRegError(f"sae-lens is not installed, so there is no release table to read; "
                      f"{INSTALL_HINT}")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


@functools.lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> dict[str, Release]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, yaml.YAMLError) as e:
        raise SAEFormatError(f"cannot read the release table {path}: "
                             f"{str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SAEFormatError(f"release table {path} must map release names to releases")
    out = {}
    for name, value in data.items():
        if not isinstance(value, dict) or not isinstance(value.get("saes"), list) \
                or not isinstance(value.get("repo_id"), str):
            raise SAEFormatError(f"release table {path}: release {name!r} needs repo_id and a "
                                 "list of saes")
        conv = value.get("conversion_func")
        saes = []
        for entry in value["saes"]:
            if not isinstance(entry, dict) or "id" not in entry or "path" not in entry:
                raise SAEFormatError(f"release table {path}: an SAE of {name!r} lacks id or "
                                     "path")
            saes.append(ReleaseSAE(
                id=str(entry["id"]), path=str(entry["path"]), l0=_number(entry.get("l0")),
                neuronpedia=entry.get("neuronpedia") if isinstance(entry.get("neuronpedia"),
                                                                   str) else None,
                norm_scaling_factor=_number(entry.get("norm_scaling_factor")),
                variance_explained=_number(entry.get("variance_explained")),
                conversion=entry["conversion_func"] if "conversion_func" in entry else conv))
        out[str(name)] = Release(str(name), value["repo_id"], str(value.get("model") or ""),
                                 conv, tuple(saes))
    return out


def load_table(table: str | os.PathLike | None = None) -> dict[str, Release]:
    """Every release of the table (see :func:`table_path`), by name."""
    p = table_path(table)
    return _load(str(p), p.stat().st_mtime)


def get_release(name: str, table: str | os.PathLike | None = None) -> Release:
    releases = load_table(table)
    if name not in releases:
        raise NotFoundError("release", name, known=list(releases),
                            hint="see `saereg releases`")
    return releases[name]


def layout(entry: ReleaseSAE) -> str:
    """The layout an SAE is stored in (an unknown conversion gets its own name)."""
    name = LAYOUTS.get(entry.conversion, entry.conversion or "saelens")
    if name == "gemmascope2" and ("transcoder" in entry.path or "clt" in entry.path):
        return "gemmascope2-transcoder"
    return name


def check_supported(release: Release, entry: ReleaseSAE) -> str:
    """The layout of ``entry`` if this project converts it; otherwise one error naming it."""
    kind = layout(entry)
    if kind in SUPPORTED:
        return kind
    why = REFUSED.get(kind, "a layout this project has no converter for")
    raise SAEFormatError(f"{release.name}/{entry.id} is stored in the {kind} layout "
                         f"(SAELens conversion {entry.conversion}), {why}; nothing was pulled "
                         f"(supported layouts: {', '.join(SUPPORTED)})")


_WIDTH = re.compile(r"(?:width[_-]?|[_-]w|^w)(\d+(?:\.\d+)?)([km]?)(?![a-z0-9])", re.I)
_POW = re.compile(r"2pow(\d+)")
_LAYER = re.compile(r"(?:layer|blocks)[._]?(\d+)|\bl(\d+)[a-z]", re.I)


def width(release: Release, entry: ReleaseSAE) -> int | None:
    """The number of latents, where the id, path or repo says it (``width_16k``, ``W32K``,
    ``2pow14``, ``-32x`` is not a width)."""
    for text in (entry.id, entry.path, release.repo.split("/")[-1], release.name):
        m = _WIDTH.search(text)
        if m:
            scale = {"k": 1024, "m": 1 << 20, "": 1}[m.group(2).lower()]
            raw = float(m.group(1)) * scale
            power = 2 ** round(math.log2(raw)) if raw >= 1 else 1
            return power if scale > 1 and abs(power - raw) < 0.05 * raw else int(raw)
        m = _POW.search(text)
        if m:
            return 1 << int(m.group(1))
    return None


def hook(release: Release, entry: ReleaseSAE) -> str:
    """The hook, in SAELens's names: the id when it is one (``blocks.6.hook_resid_post``),
    else ``blocks.N.<site>`` from the layer and the site the path or repo names (residual
    stream, MLP output, attention), ``hook_embed`` for embeddings, else ``layer N``."""
    if "hook_" in entry.id:
        return entry.id.split("__")[0]
    text = f"{entry.path} {release.repo} {release.name}".lower()
    if "embedding" in entry.path:
        return "hook_embed"
    m = _LAYER.search(entry.id) or _LAYER.search(entry.path)
    if not m:
        return ""
    layer = next(g for g in m.groups() if g is not None)
    for words, site in ((("resid", "-res", "_res"), "hook_resid_post"),
                        (("mlp",), "hook_mlp_out"), (("att",), "attn.hook_z")):
        if any(w in text for w in words):
            return f"blocks.{layer}.{site}"
    return f"layer {layer}"


def search(releases: dict[str, Release], *, model: str | None = None,
           word: str | None = None) -> list[Release]:
    """Releases of ``model`` (a substring, case-insensitive) whose name, repo, model or an SAE
    id holds ``word``; a release matched only through SAE ids keeps only those SAEs."""
    out = []
    for rel in releases.values():
        if model and model.lower() not in rel.model.lower():
            continue
        if word:
            w = word.lower()
            if not any(w in t.lower() for t in (rel.name, rel.repo, rel.model)):
                saes = tuple(e for e in rel.saes if w in e.id.lower())
                if not saes:
                    continue
                rel = Release(rel.name, rel.repo, rel.model, rel.conversion, saes)
        out.append(rel)
    return out
