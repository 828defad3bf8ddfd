"""What a pushed SAE carries besides its SAELens files: ``registry.json`` (name, version,
sha256 of every file, metrics, lineage) and the repo's README model card (YAML metadata and a
table of every SAE in the repo); ``features.parquet`` is written by :mod:`saereg.registry.hub.features`.

The card keeps a machine-readable index of the repo's SAEs in an HTML comment, so a later push
adds its row without downloading every ``registry.json`` of the repo.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from saereg.registry.refs import format_hf_ref

REGISTRY_FILE = "registry.json"
FEATURES_FILE = "features.parquet"
README_FILE = "README.md"
REGISTRY_FORMAT = "saereg.registry/1"
_INDEX_RE = re.compile(r"<!-- saereg-index\n(.*?)\n-->", re.DOTALL)
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def registry_record(info, files: dict[str, Path]) -> dict[str, Any]:
    """registry.json for a catalog version (``info``: a VersionInfo) whose files are ``files``
    (name -> local path)."""
    return {
        "format": REGISTRY_FORMAT,
        "name": info.name,
        "version": info.number,
        "uid": info.uid,
        "status": info.status,
        "files": {name: {"sha256": sha256_file(p), "size": p.stat().st_size}
                  for name, p in sorted(files.items())},
        "metrics": info.metrics,
        "key_metrics": info.key_metrics,
        "lineage": {"model": info.model, "hook": info.hook, "architecture": info.architecture,
                    "d_in": info.d_in, "d_sae": info.d_sae, "dataset": info.dataset,
                    "training_tokens": info.training_tokens, "context_size": info.context_size,
                    "mlflow_run_id": info.mlflow_run_id, "parent": info.parent},
        "tags": info.tags,
        "created_at": info.created_at.isoformat() if info.created_at else None,
    }


_TEXT_FIELDS = ("name", "tag", "model", "hook", "architecture")
_INT_FIELDS = ("version", "d_sae")
_NUMBER_FIELDS = ("l0", "explained_variance")


def _entry(value: Any) -> dict[str, Any] | None:
    """One SAE of the index as read from a card (anyone with write access may have edited it):
    only the fields the card shows, each of its type (a string of at most 256 printable
    characters, an integer, a finite number) or None; not an object: None."""
    if not isinstance(value, dict):
        return None
    out: dict[str, Any] = {}
    for k in _TEXT_FIELDS:
        v = value.get(k)
        out[k] = v if isinstance(v, str) and len(v) <= 256 and v.isprintable() else None
    for k in _INT_FIELDS:
        v = value.get(k)
        out[k] = v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 53 \
            else None
    for k in _NUMBER_FIELDS:
        v = value.get(k)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        out[k] = float(v) if ok else None
    return out


def read_index(readme: str | None) -> dict[str, dict[str, Any]]:
    """The index of the repo's SAEs kept in its card (path -> fields), or {} without one. What
    the card holds is checked, not trusted: entries whose path is not a folder name a push
    would use, or that are not objects, are left out, and fields keep only values of their
    type (see :func:`_entry`)."""
    from saereg.registry.errors import UsageError
    from saereg.registry.refs import validate_repo_path

    if not readme:
        return {}
    m = _INDEX_RE.search(readme)
    if not m:
        return {}
    try:
        data = json.loads(m.group(1))
    except (ValueError, RecursionError):
        return {}
    out = {}
    for path, value in (data.items() if isinstance(data, dict) else ()):
        try:
            ok = isinstance(path, str) and validate_repo_path(path) == path
        except UsageError:
            ok = False
        entry = _entry(value) if ok else None
        if entry is not None:
            out[path] = entry
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def _cell(value: Any) -> str:
    """A table cell: one line, pipes escaped, no HTML (the Hub renders the card); None: -."""
    if value is None:
        return "-"
    text = " ".join(str(value).split())
    return (text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")
            .replace(">", "&gt;"))


def render_card(repo: str, index: dict[str, dict[str, Any]], old: str | None = None) -> str:
    """The README: YAML metadata, a table of the repo's SAEs, the index comment. Text a user
    wrote below the generated part of an existing card is kept."""
    models = sorted({e["model"] for e in index.values() if e.get("model")})
    hub_models = [m for m in models if _HUB_ID_RE.fullmatch(m)]
    yaml = ["---", "library_name: saelens", "tags:", "- sae", "- sparse-autoencoder",
            "- saereg"]
    if hub_models:
        yaml += ["base_model:"] + [f"- {json.dumps(m)}" for m in hub_models]
    yaml.append("---")
    lines = [*yaml, "", f"# {repo}", "",
             ("Sparse autoencoders published with sae-registry, in the SAELens layout: load one "
              "with `sae_lens.SAE.load_from_disk` on a downloaded folder, or with "
              f"`saereg.registry.api.load_sae(\"{format_hf_ref(repo, 'PATH', 'TAG')}\")`. Each "
              "folder's registry.json lists the sha256 of every file, the metrics and the "
              "lineage."), "",
             ("| path | SAE | version | tag | model | hook | architecture | d_sae | L0 | "
              "explained variance |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(index):
        e = index[path]
        cells = [path or ".", *(e.get(k) for k in ("name", "version", "tag", "model", "hook",
                                                   "architecture", "d_sae"))]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + f" | {_fmt(e.get('l0'), 1)} | "
                     f"{_fmt(e.get('explained_variance'))} |")
    # in JSON '<' and '>' occur only inside strings, where \u003c and \u003e read back the same;
    # so no value can close the comment
    index_json = (json.dumps(index, sort_keys=True).replace("<", "\\u003c")
                  .replace(">", "\\u003e"))
    lines += ["", "<!-- saereg-index", index_json, "-->", ""]
    tail = ""
    if old and "<!-- saereg-end -->" in old:
        tail = old.split("<!-- saereg-end -->", 1)[1]
    return "\n".join(lines) + "<!-- saereg-end -->" + (tail or "\n")
