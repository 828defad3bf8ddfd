"""SAE references and the names they are made of.

A reference is one of:

- ``NAME``: the latest version that is not deprecated (or the latest, if all are);
- ``NAME@3``: version 3; ``NAME@latest`` is the same as ``NAME``;
- ``NAME@prod``: the version the alias ``prod`` points at;
- a local directory holding an SAE folder (``./my_sae``, ``/data/saes/l6``);
- ``hf://ORG/REPO/PATH@REV``: a published SAE on the Hugging Face Hub (PATH and ``@REV`` are
  optional; REV is a branch, tag or commit, default ``main``);
- ``saelens://RELEASE/ID@REV``: an SAE that SAELens's release table names (``@REV`` optional,
  default ``main``), pulled into the catalog by name (see :mod:`saereg.registry.hub.releases`).

SAE names are 1-128 characters of letters, digits, ``.``, ``_`` and ``-``, starting with a
letter or digit. Alias names are letters, digits, ``_`` and ``-``, starting with a letter, and
may not look like a version (``3``, ``v3``) or be ``latest``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from saereg.registry.errors import UsageError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ALIAS_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
VERSIONISH_RE = re.compile(r"[vV]?[0-9]+")
TAG_KEY_RE = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
LATEST = "latest"
REPO_PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
REVISION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,255}")


RELEASE_SCHEME = "saelens://"


@dataclass(frozen=True)
class Ref:
    """A parsed reference: ``kind`` is ``catalog``, ``dir``, ``hub`` (``repo``, ``repo_path``
    and ``revision`` set) or ``release`` (``name`` is the release, ``repo_path`` the SAE id,
    ``revision`` set when given)."""

    kind: str
    name: str = ""
    version: int | None = None
    alias: str | None = None
    path: Path | None = None
    text: str = ""
    repo: str = ""
    repo_path: str = ""
    revision: str | None = None

    def __str__(self) -> str:
        return self.text


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(f"invalid SAE name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def validate_alias(alias: str) -> str:
    if isinstance(alias, str) and VERSIONISH_RE.fullmatch(alias):
        raise UsageError(f"alias {alias!r} looks like a version number; aliases are names such "
                         "as prod or staging (versions are addressed as NAME@3)")
    if alias == LATEST:
        raise UsageError("'latest' is reserved (NAME@latest is always the newest version); "
                         "choose another alias")
    if not isinstance(alias, str) or not ALIAS_RE.fullmatch(alias):
        raise UsageError(f"invalid alias {alias!r}: use 1-64 letters, digits, '_' or '-', "
                         "starting with a letter")
    return alias


def validate_tag_key(key: str) -> str:
    if not isinstance(key, str) or not TAG_KEY_RE.fullmatch(key):
        raise UsageError(f"invalid tag key {key!r}: use 1-128 letters, digits or _ . : / -")
    return key


def validate_repo_id(repo: str) -> str:
    """``ORG/NAME``: two parts of letters, digits, ``_ . -``, no ``..`` and no ``--``."""
    parts = repo.split("/") if isinstance(repo, str) else []
    if (len(parts) != 2 or not all(REPO_PART_RE.fullmatch(p) for p in parts)
            or ".." in repo or "--" in repo or repo.endswith((".", ".git"))):
        raise UsageError(f"invalid Hub repo id {repo!r}: use ORG/NAME with letters, digits, "
                         "'_', '.' or '-' (no '..', '--' or path tricks)")
    return repo


def validate_repo_path(path: str) -> str:
    """A folder inside a repo: relative, ``/``-separated, each part a plain name."""
    path = (path or "").strip("/")
    if not path:
        return ""
    if any(not part or part in (".", "..") or not REPO_PART_RE.fullmatch(part)
           for part in path.split("/")):
        raise UsageError(f"invalid path in repo {path!r}: use names of letters, digits, '_', "
                         "'.' or '-' separated by '/', without '.' or '..'")
    return path


def validate_revision(rev: str) -> str:
    if not REVISION_RE.fullmatch(rev or "") or ".." in rev:
        raise UsageError(f"invalid revision {rev!r}: a branch, tag or commit id")
    return rev


def looks_like_path(text: str, *, hub_ids: bool = False) -> bool:
    """Whether ``text`` is written as a local path rather than a name.

    It is when it starts with ``.``, ``/`` or ``~``, or holds the OS path separator. A ``/``
    elsewhere makes it a path too, unless ``hub_ids`` says names may be hub ids (``ORG/NAME``,
    as model and dataset names are): then it takes two ``/`` (no hub id has them). SAE names
    never hold ``/``, so for SAE references any ``/`` means a path.
    """
    if text.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in text):
        return True
    return text.count("/") >= (2 if hub_ids else 1)


def format_hf_ref(repo: str, path: str = "", revision: str | None = None) -> str:
    """The ``hf://ORG/REPO/PATH@REV`` reference :func:`parse_ref` reads back: no ``/PATH`` for
    the repo root, no ``@REV`` when ``revision`` is empty."""
    path = (path or "").strip("/")
    return (f"hf://{repo}" + (f"/{path}" if path else "")
            + (f"@{revision}" if revision else ""))


def format_release_ref(release: str, sae_id: str, revision: str | None = None) -> str:
    """The ``saelens://RELEASE/ID@REV`` reference :func:`parse_ref` reads back."""
    return f"{RELEASE_SCHEME}{release}/{sae_id}" + (f"@{revision}" if revision else "")


def _parse_release_ref(text: str) -> Ref:
    body, at, revision = text[len(RELEASE_SCHEME):].partition("@")
    release, _, sae_id = body.partition("/")
    if not release or not sae_id.strip("/") or (at and not revision):
        raise UsageError(f"{text!r}: a release reference is saelens://RELEASE/SAE_ID[@REV] "
                         "(see `saereg releases`)")
    if not NAME_RE.fullmatch(release):
        raise UsageError(f"{text!r}: invalid release name {release!r} (letters, digits, "
                         "'.', '_' or '-')")
    try:
        sae_id = validate_repo_path(sae_id)
    except UsageError:
        raise UsageError(f"{text!r}: invalid SAE id {sae_id!r} (names of letters, digits, "
                         "'_', '.' or '-' separated by '/')") from None
    return Ref("release", name=release, repo_path=sae_id,
               revision=validate_revision(revision) if revision else None, text=text)


def parse_ref(text: str | os.PathLike) -> Ref:
    """Parse an SAE reference (see the module docstring)."""
    if isinstance(text, os.PathLike):
        return Ref("dir", path=Path(text), text=str(text))
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"empty or invalid SAE reference {text!r}")
    text = text.strip()
    if text.startswith("hf://"):
        body, _, revision = text[len("hf://"):].partition("@")
        parts = body.strip("/").split("/")
        if len(parts) < 2:
            raise UsageError(f"{text!r}: a hub reference is hf://ORG/NAME[/PATH][@REV]")
        repo = validate_repo_id("/".join(parts[:2]))
        return Ref("hub", repo=repo, repo_path=validate_repo_path("/".join(parts[2:])),
                   revision=validate_revision(revision) if revision else None, text=text)
    if text.startswith(RELEASE_SCHEME):
        return _parse_release_ref(text)
    if "://" in text:
        raise UsageError(f"unsupported reference scheme in {text!r}; use NAME, NAME@VERSION, "
                         "NAME@ALIAS, a local directory, hf://... or saelens://RELEASE/ID")
    if looks_like_path(text) or (Path(text).is_dir()
                                 and not NAME_RE.fullmatch(text.split("@")[0])):
        path = Path(text).expanduser()
        if not path.is_dir():
            raise UsageError(f"{text}: no such directory (a reference is NAME, NAME@VERSION, "
                             "NAME@ALIAS or a local SAE folder)")
        return Ref("dir", path=path, text=text)
    name, sep, tail = text.partition("@")
    validate_name(name)
    if not sep or tail == LATEST:
        return Ref("catalog", name=name, text=text)
    if not tail:
        raise UsageError(f"{text!r}: nothing after '@' (use NAME@3 or NAME@prod)")
    if VERSIONISH_RE.fullmatch(tail):
        number = int(tail.lstrip("vV"))
        if number < 1:
            raise UsageError(f"{text!r}: versions start at 1")
        return Ref("catalog", name=name, version=number, text=text)
    if not ALIAS_RE.fullmatch(tail):
        raise UsageError(f"{text!r}: {tail!r} is neither a version number nor an alias name")
    return Ref("catalog", name=name, alias=tail, text=text)


def format_ref(name: str, number: int) -> str:
    return f"{name}@{number}"
