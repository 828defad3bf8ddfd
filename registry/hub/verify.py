"""Checks on what a pull (or an ``hf://`` load) takes from a Hub repo, made before anything
uses it.

Three things are checked, each on its own:

- the Hub's own listing at the pinned commit (``get_paths_info``): each file's size and, for
  LFS files, its sha256 (the git blob sha1 otherwise). Every downloaded file must match it.
- ``registry.json``, when the folder has one: it can add facts (the sha256 the publisher
  recorded, metrics, lineage) but never remove a check. Every file of the SAE that is there
  (cfg.json, sae_weights.safetensors, and sparsity.safetensors / features.parquet when
  present) must be listed in it and match it, and one it lists must be there. Its fields must
  have their JSON types, and its metrics must be finite numbers (a NaN or an infinity is
  refused, naming the metric); cfg.json may hold no NaN or infinity either.
- names: no path taken from a remote file (a repo file name, a registry.json entry) may leave
  the download folder. Absolute paths, ``..``, empty or ``.`` parts, backslashes, control
  characters (NUL among them) and drive letters are refused, naming the entry. Files are only
  opened under names built from the checked listing, never under a registry.json entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saereg.registry.errors import ChecksumError, HubError, SAEFormatError
from saereg.registry.hub.card import FEATURES_FILE, REGISTRY_FILE, sha256_file

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SAE_FILES = (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE)
PUBLISHED_FILES = (*SAE_FILES, REGISTRY_FILE, FEATURES_FILE)
CHECKED_FILES = (*SAE_FILES, FEATURES_FILE)
"""The files registry.json must list (when they are there) and that must match it."""

_SHA1 = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DRIVE = re.compile(r"[A-Za-z]:")


def _kind(value: Any) -> str:
    """The JSON type of ``value``, as an error message names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    return {dict: "an object", list: "a list", str: "a string", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


# -- names ---------------------------------------------------------------------------------------

def remote_path(name: Any, what: str) -> str:
    """``name`` (a path that came from a remote file) if it stays inside the folder it is
    joined to; otherwise an error naming it (``what`` says where it came from)."""
    if not isinstance(name, str) or not name:
        raise SAEFormatError(f"{what} {name!r} is not a file name; refusing it")
    parts = name.split("/")
    reason = None
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        reason = "holds a control character"
    elif "\\" in name:
        reason = "holds a backslash"
    elif name.startswith("/"):
        reason = "is an absolute path"
    elif _DRIVE.match(name):
        reason = "starts with a drive letter"
    elif ".." in parts:
        reason = "holds '..'"
    elif any(p in ("", ".") for p in parts):
        reason = "holds an empty or '.' part"
    if reason:
        raise SAEFormatError(f"{what} {name!r} {reason}: a path from a remote file must stay "
                             "inside the download folder; refusing it")
    return name


def sae_folders(names: list[Any], prefix: str, where: str) -> dict[str, list[str]]:
    """The SAE folders (those with a cfg.json) among a repo's file ``names`` that are under
    ``prefix``, each with the repo paths of the published files it holds. Every name that
    would be downloaded is checked with :func:`remote_path` first."""
    picked = []
    for name in names:
        if isinstance(name, str) and (name.rsplit("/", 1)[-1] not in PUBLISHED_FILES
                                      or prefix and not name.startswith(prefix + "/")):
            continue
        picked.append(remote_path(name, f"{where}: file name"))
    def folder(n: str) -> str:
        return n.rsplit("/", 1)[0] if "/" in n else ""

    folders = {folder(n) for n in picked if n.rsplit("/", 1)[-1] == CFG_FILE}
    return {f: sorted(n for n in picked if folder(n) == f) for f in sorted(folders)}


# -- the Hub's listing ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Listed:
    """One file as the Hub lists it at a commit."""

    path: str
    size: int
    sha256: str | None
    """For LFS files; the others are known by their git blob sha1."""
    sha1: str | None


def check_commit(sha: Any, where: str) -> str:
    if not isinstance(sha, str) or not _SHA1.fullmatch(sha):
        raise HubError(f"{where}: the server named no commit for it (got {sha!r})")
    return sha


def hub_listing(api, repo: str, commit: str, paths: list[str], where: str) -> dict[str, Listed]:
    """Size and hash of each of ``paths`` at ``commit``, as the Hub lists them."""
    out: dict[str, Listed] = {}
    wanted = set(paths)
    for entry in api.get_paths_info(repo, paths, revision=commit) if paths else []:
        path = getattr(entry, "path", None)
        if not isinstance(path, str) or path not in wanted:
            continue  # only the paths asked for are looked at
        size, lfs = getattr(entry, "size", None), getattr(entry, "lfs", None)
        sha256 = getattr(lfs, "sha256", None) if lfs is not None else None
        sha1 = getattr(entry, "blob_id", None)
        if (not isinstance(size, int) or isinstance(size, bool) or size < 0
                or (lfs is not None and not (isinstance(sha256, str)
                                             and _SHA256.fullmatch(sha256)))
                or (lfs is None and not (isinstance(sha1, str) and _SHA1.fullmatch(sha1)))):
            raise HubError(f"{where}: the Hub's listing gives no usable size and hash for "
                           f"{path}; refusing it")
        out[path] = Listed(path, size, sha256, sha1 if lfs is None else None)
    missing = [p for p in paths if p not in out]
    if missing:
        raise HubError(f"{where}: the Hub's listing at that commit lacks {missing[0]}, which "
                       "the repo lists; refusing it")
    return out


def git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_download(local: Path, listed: Listed, where: str) -> None:
    """The downloaded file ``local`` is the one the Hub lists (size, then hash)."""
    size = local.stat().st_size
    if size != listed.size:
        found = (f"{listed.size} bytes listed, {size} downloaded")
    elif listed.sha256 is not None:
        actual = sha256_file(local)
        found = None if actual == listed.sha256 else \
            f"sha256 {listed.sha256} listed, {actual} downloaded"
    else:
        actual = git_blob_sha1(local)
        found = None if actual == listed.sha1 else \
            f"git blob sha1 {listed.sha1} listed, {actual} downloaded"
    if found:
        raise HubError(f"{listed.path} downloaded from {where} is not the file the Hub lists at "
                       f"that commit ({found}); refusing it")


# -- registry.json -------------------------------------------------------------------------------

def _number(value: Any, what: str, *, integer: bool = False, below: int = 2 ** 63) -> None:
    ok = (isinstance(value, int) if integer else isinstance(value, (int, float)))
    if not ok or isinstance(value, bool):
        raise SAEFormatError(f"{what} must be {'an integer' if integer else 'a number'}, not "
                             f"{_kind(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SAEFormatError(f"{what} is not a finite number ({value}); refusing it")
    if integer and not 0 <= value < below:
        raise SAEFormatError(f"{what} must be an integer in 0..{below - 1}, not {value}")


def _optional(record: dict, key: str, types: tuple[type, ...], what: str) -> Any:
    value = record.get(key)
    if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
        want = {dict: "an object", str: "a string", int: "an integer"}[types[0]]
        raise SAEFormatError(f"{what}: {key!r} must be {want}, not {_kind(value)}")
    return value


def _unstorable(value: Any, trail: str) -> str | None:
    """Where in the JSON ``value`` a NaN, an infinity or a string with a NUL is (what no
    catalog database stores as given), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{trail or 'the value'} is not a finite number ({value})"
    if isinstance(value, str) and "\0" in value:
        return f"{trail or 'the value'} holds a NUL character"
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and "\0" in key:
            return f"key {key!r} holds a NUL character"
        found = _unstorable(item, f"{trail}.{key}" if trail else str(key))
        if found:
            return found
    return None


def _load_json(path: Path, what: str) -> tuple[Any, str | None]:
    """The JSON in ``path``, and where in it is a value no catalog stores (see _unstorable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data, _unstorable(data, "")
    except RecursionError:
        raise SAEFormatError(f"{what} nests too deeply; refusing it") from None
    except (OSError, ValueError) as e:
        raise SAEFormatError(f"{what} is unreadable ({str(e).splitlines()[0]})") from None


def read_record(path: Path, where: str) -> dict[str, Any]:
    """registry.json at ``path``, with the fields a pull uses checked for their JSON types and
    every entry of ``files`` for its name; metrics must be finite numbers."""
    what = f"{where}: {REGISTRY_FILE}"
    record, found = _load_json(path, what)
    if not isinstance(record, dict):
        raise SAEFormatError(f"{what} must hold a JSON object, not {_kind(record)}")
    files = record.get("files")
    if not isinstance(files, dict):
        raise SAEFormatError(f"{what}: 'files' must be an object (file name -> sha256 and "
                             f"size), not {_kind(files)}")
    for name, meta in files.items():
        remote_path(name, f"{what} entry")
        if not isinstance(meta, dict):
            raise SAEFormatError(f"{what}: entry {name!r} must be an object, not {_kind(meta)}")
        sha = meta.get("sha256")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise SAEFormatError(f"{what}: entry {name!r} needs a sha256 of 64 hex digits; got "
                                 f"{sha!r}")
        if meta.get("size") is not None:
            _number(meta["size"], f"{what}: size of {name!r}", integer=True)
    _optional(record, "name", (str,), what)
    if record.get("version") is not None:
        _number(record["version"], f"{what}: 'version'", integer=True)
    for key, value in (_optional(record, "metrics", (dict,), what) or {}).items():
        _number(value, f"{what} metric {key!r}")
    lineage = _optional(record, "lineage", (dict,), what) or {}
    for key in ("dataset", "mlflow_run_id"):
        _optional(lineage, key, (str,), f"{what} lineage")
    for key, below in (("training_tokens", 2 ** 63), ("context_size", 2 ** 31)):
        if _optional(lineage, key, (int,), f"{what} lineage") is not None:
            _number(lineage[key], f"{what} lineage {key!r}", integer=True, below=below)
    if found:
        raise SAEFormatError(f"{what}: {found}; refusing it")
    return record


def check_record(folder: Path, record: dict[str, Any], present: list[str], where: str) -> None:
    """Every file of ``present`` (names in ``folder``) that registry.json must list is listed
    and matches; every such file it lists is present."""
    files = record["files"]
    for name in CHECKED_FILES:
        if name in present and name not in files:
            raise SAEFormatError(f"{where}: {REGISTRY_FILE} does not list {name}; it must list "
                                 "every file of the SAE, refusing the folder")
        if name in files and name not in present:
            raise SAEFormatError(f"{where}: {REGISTRY_FILE} lists {name}, which the folder "
                                 "lacks; refusing it")
        if name not in present:
            continue
        actual = sha256_file(folder / name)  # (its sha256 decides; a size is only a fact)
        if actual != files[name]["sha256"]:
            raise ChecksumError(name, files[name]["sha256"], actual, where)


def check_folder(folder: Path, where: str) -> dict[str, Any] | None:
    """The checks that need only the downloaded folder: sae_weights.safetensors is there,
    cfg.json holds no NaN, infinity or NUL, and registry.json (if any) is well-formed and
    agrees with every file. Returns the record (None for a folder without registry.json)."""
    present = [n for n in PUBLISHED_FILES if (folder / n).is_file()]
    if WEIGHTS_FILE not in present:
        raise SAEFormatError(f"{where}: {WEIGHTS_FILE} is missing next to {CFG_FILE}")
    _, found = _load_json(folder / CFG_FILE, f"{where}: {CFG_FILE}")
    if found:
        raise SAEFormatError(f"{where}: {CFG_FILE}: {found}; refusing it")
    if REGISTRY_FILE not in present:
        return None
    record = read_record(folder / REGISTRY_FILE, where)
    check_record(folder, record, present, where)
    return record
