"""The Python API for other projects: register, load, export, collect garbage.

``load_sae("name@prod", device="cuda", dtype="bfloat16")`` needs only this package and
``SAEREG_HOME`` or ``SAEREG_DATABASE_URL``: the version's row says where its files are, and
every file is checked against its sha256 before the SAE is built.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saereg.registry.catalog.queries import VersionInfo, referenced_blobs, referenced_trees
from saereg.registry.catalog.store import ArtifactStore, age_ok
from saereg.registry.catalog.writes import Catalog
from saereg.registry.errors import (DeprecatedVersionWarning, DestinationError, MirrorError,
                                    UsageError)
from saereg.registry.refs import parse_ref
from saereg.registry.sae.folder import write_atomic_dir

if TYPE_CHECKING:
    import torch

    from saereg.registry.sae.modules import SAE

DEFAULT_GC_MIN_AGE = 3600.0
PROVENANCE_FILE = "saereg.json"


def register_from_run(run_id: str, name: str, *, tags: Mapping[str, str] | None = None,
                      note: str | None = None, parent: str | None = None,
                      database_url: str | None = None, tracking_uri: str | None = None,
                      store_url: str | None = None) -> VersionInfo:
    """Register the SAE that MLflow run ``run_id`` logged (artifact ``sae/``) as the next version
    of ``name``, and mirror it as a version of the MLflow registered model ``name``.

    The run must be FINISHED. Lineage comes from the run: params (``job.*``, ``sae.*``), final
    metrics (``eval/*``, ``final/*``), dataset, token count, context size. ``tags`` are set on
    the version (catalog and MLflow), ``note`` is its first note, ``parent`` a reference to the
    version it was derived from (``NAME@N``). The database is ``database_url`` or
    ``SAEREG_DATABASE_URL`` or the SQLite catalog in ``SAEREG_HOME``; MLflow is
    ``tracking_uri`` or ``saereg.registry.paths.mlflow_tracking_uri()``; files go to ``store_url`` or
    ``SAEREG_ARTIFACT_STORE`` or ``$SAEREG_HOME/artifacts``.

    Returns the new version. Raises ``NotFoundError`` (unknown run or parent),
    ``SAEFormatError`` (no or inconsistent SAE folder), ``SAEMismatchError`` (``name`` is bound
    to another model, hook, architecture or shape), ``MirrorError`` (MLflow side failed;
    nothing was recorded), ``CatalogBusyError``.
    """
    cat = Catalog(database_url, store_url=store_url, tracking_uri=tracking_uri)
    return cat.register_run(run_id, name, tags=tags, note=note, parent=parent)


def register_from_folder(path: str | Path, name: str, *, model: str | None = None,
                         hook: str | None = None, tags: Mapping[str, str] | None = None,
                         note: str | None = None, parent: str | None = None,
                         metrics: Mapping[str, float] | None = None,
                         database_url: str | None = None, tracking_uri: str | None = None,
                         store_url: str | None = None) -> VersionInfo:
    """Register an SAE folder (this project's or SAELens's layout) as the next version of
    ``name``. ``model`` and ``hook`` are needed only when ``cfg.json`` does not name them;
    ``metrics`` adds to (or replaces) what a linked run provides; a value in it that is not a
    finite number is refused, naming it (a NaN that comes from a run is left out, with a
    warning). See
    :func:`register_from_run` for the rest."""
    cat = Catalog(database_url, store_url=store_url, tracking_uri=tracking_uri)
    return cat.register_folder(path, name, model=model, hook=hook, tags=tags, note=note,
                               parent=parent, metrics=metrics)


def get_version(ref: str | VersionInfo, *, database_url: str | None = None) -> VersionInfo:
    """What the catalog records about ``ref`` (``NAME``, ``NAME@3``, ``NAME@prod``). A
    :class:`VersionInfo` already looked up is returned as it is, so a caller that resolved a
    reference once (a web request) can hand it to every library call without a new lookup."""
    if isinstance(ref, VersionInfo):
        return ref
    return Catalog(database_url).get(ref)


def _warn_if_deprecated(info: VersionInfo) -> None:
    if info.deprecated:
        warnings.warn(DeprecatedVersionWarning(
            f"{info.ref} is deprecated: {info.deprecation_reason}"), stacklevel=3)


def import_sae(path: str | Path, name: str, *, fmt: str = "auto", model: str | None = None,
               hook: str | None = None, tags: dict[str, str] | None = None,
               database_url: str | None = None) -> VersionInfo:
    """Convert a foreign SAE (sparsify, Gemma Scope npz, dictionary_learning, SAELens; ``fmt``
    ``auto`` detects it) and register it as the next version of ``name``."""
    from saereg.registry.sae.folder import save_sae
    from saereg.registry.sae.formats import read_foreign

    sae = read_foreign(path, fmt)
    meta = sae.cfg.metadata
    if model:
        meta["model_name"] = model
    if hook:
        meta["hook_name"] = hook
    meta["imported_from"] = f"{fmt}:{Path(path).expanduser().resolve()}"
    with tempfile.TemporaryDirectory(prefix="saereg-import-") as tmp:
        folder = save_sae(sae, Path(tmp) / "sae")
        return Catalog(database_url).register_folder(folder, name, model=model, hook=hook,
                                                     tags=tags, link_run=False)


def convert_sae(ref: str, dest: str | Path, *, to: str = "saelens",
                overwrite: bool = False) -> Path:
    """Write the SAE ``ref`` names (catalog, folder or hf://) in layout ``to``."""
    from saereg.registry.sae.folder import save_sae
    from saereg.registry.sae.formats import EXPORT_FORMATS, export_sparsify

    if to not in EXPORT_FORMATS:
        raise UsageError(f"cannot export to {to!r}; use one of {', '.join(EXPORT_FORMATS)}")
    dest = Path(dest).expanduser().absolute()
    _check_destination(dest, overwrite)
    sae = load_sae(ref)
    if to == "sparsify":
        return export_sparsify(sae, dest, overwrite=overwrite)
    return save_sae(sae, dest, overwrite=overwrite)


def load_sae(ref: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: torch.dtype | str | None = None, *,
             database_url: str | None = None) -> SAE:
    """Load an SAE as a torch module on ``device`` (and ``dtype``, if given).

    ``ref`` is ``NAME`` (latest non-deprecated version), ``NAME@3``, ``NAME@alias``, a local
    SAE folder, ``hf://ORG/NAME/PATH@REV`` (downloaded through huggingface_hub's cache, only
    that folder at that revision, checked against its registry.json; works offline once
    cached), or ``saelens://RELEASE/ID@REV`` (an SAE of SAELens's release table, pulled into
    the catalog once, see :mod:`saereg.registry.hub.release_pull`, then loaded from there; when
    the Hub cannot be asked, the copy pulled before). Every stored file is checked against the
    sha256 recorded at registration (``ChecksumError`` names the file and both hashes). A
    deprecated version loads with a :class:`DeprecatedVersionWarning`. The module's
    ``cfg.metadata`` gains ``saereg_ref``.
    """
    from saereg.registry.sae.folder import load_sae as load_folder

    parsed = parse_ref(ref)
    if parsed.kind == "dir":
        return load_folder(parsed.path, device=device, dtype=dtype)
    if parsed.kind == "hub":
        from saereg.registry.hub.sync import download_ref

        folder, where = download_ref(parsed.text)
        sae = load_folder(folder, device=device, dtype=dtype)
        sae.cfg.metadata.update(saereg_ref=where)
        return sae
    if parsed.kind == "release":
        from saereg.registry.errors import HubError, NotFoundError
        from saereg.registry.hub.release_pull import pull_ref

        try:
            parsed = parse_ref(pull_ref(parsed.text, database_url=database_url).ref)
        except HubError as e:  # the Hub unreachable (or offline): a copy pulled before serves
            try:
                Catalog(database_url).get(parsed)
            except NotFoundError:
                raise e from None
    info = Catalog(database_url).get(parsed)
    _warn_if_deprecated(info)
    with tempfile.TemporaryDirectory(prefix="saereg-load-") as tmp:
        ArtifactStore(info.artifact_uri).materialize(info.files, tmp, link=True, where=info.ref)
        sae = load_folder(tmp, device=device, dtype=dtype, where=info.ref)
    sae.cfg.metadata.update(saereg_ref=info.ref, saereg_uid=info.uid)
    return sae


def export_sae(ref: str, dest: str | Path, *, overwrite: bool = False,
               database_url: str | None = None) -> Path:
    """Write a verified copy of a version's files to the folder ``dest`` (SAELens layout, plus
    ``saereg.json`` saying where it came from). The folder appears complete or not at all."""
    import json

    info = Catalog(database_url).get(ref)
    _warn_if_deprecated(info)
    dest = Path(dest).expanduser().absolute()
    _check_destination(dest, overwrite)

    def fill(tmp: Path) -> None:
        ArtifactStore(info.artifact_uri).materialize(info.files, tmp, where=info.ref)
        (tmp / PROVENANCE_FILE).write_text(json.dumps({
            "ref": info.ref, "uid": info.uid, "model": info.model, "hook": info.hook,
            "mlflow_run_id": info.mlflow_run_id, "status": info.status,
            "files": {f.name: {"sha256": f.sha256, "size": f.size} for f in info.files},
        }, indent=2) + "\n")

    try:
        return write_atomic_dir(dest, fill, overwrite=True)
    except OSError as e:
        if not e.filename or not Path(e.filename).absolute().is_relative_to(dest.parent):
            raise
        raise DestinationError(f"cannot export to {dest}: {e.strerror or e} "
                               f"({e.filename}); nothing was written") from None


def _check_destination(dest: Path, overwrite: bool) -> None:
    """Refuse, before anything is written, a destination that cannot become an export folder:
    one that exists (unless ``overwrite``; even then only an SAE folder or an empty folder is
    replaced, never a file), or one under a file or an unwritable folder."""
    if dest.exists():
        if not dest.is_dir():
            raise DestinationError(f"cannot export to {dest}: it is a file, not a folder")
        if not overwrite:
            raise UsageError(f"{dest} already exists (pass --force / overwrite=True to "
                             "replace it)")
        if any(dest.iterdir()) and not (dest / "cfg.json").is_file():
            raise UsageError(f"refusing to replace {dest}: it is not an SAE folder (no "
                             "cfg.json) and --force would delete what it holds; choose "
                             "a new folder")
    ancestor = next(p for p in dest.parents if p.exists())
    if not ancestor.is_dir():
        raise DestinationError(f"cannot export to {dest}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DestinationError(f"cannot export to {dest}: {ancestor} is not writable")


@dataclass
class GcReport:
    dry_run: bool
    blobs: list[str] = field(default_factory=list)
    trees: list[str] = field(default_factory=list)
    temporary: list[str] = field(default_factory=list)
    mlflow_versions: list[tuple[str, str]] = field(default_factory=list)
    mlflow_error: str | None = None
    store: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "store": self.store, "blobs": self.blobs,
                "trees": self.trees, "temporary": self.temporary,
                "mlflow_versions": [f"{n}/{v}" for n, v in self.mlflow_versions],
                "mlflow_error": self.mlflow_error}


def gc(*, dry_run: bool = False, min_age: float = DEFAULT_GC_MIN_AGE, mlflow: bool = True,
       database_url: str | None = None, store_url: str | None = None,
       tracking_uri: str | None = None) -> GcReport:
    """Remove what no catalog version references: blobs and trees of the artifact store,
    leftover temporary files, and MLflow model versions of this catalog whose catalog
    transaction never committed. Only things older than ``min_age`` seconds are touched.

    A registration writes its files and its MLflow version before its catalog transaction
    commits, so gc and registrations agree on what is in flight through
    :mod:`saereg.registry.catalog.inflight`: candidates are listed without blocking anyone,
    then gc waits until no registration is between its first stored file and its commit, holds
    off new ones, re-reads what the catalog references and deletes only what is still
    unreferenced. Nothing a registration in flight wrote is removed, whatever ``min_age``
    (raises ``CatalogBusyError`` if registrations stay in flight for minutes)."""
    from sqlalchemy import select

    from saereg.registry.catalog.inflight import collecting
    from saereg.registry.catalog.schema import SAEVersion

    cat = Catalog(database_url, store_url=store_url, tracking_uri=tracking_uri)
    store = cat.store
    report = GcReport(dry_run=dry_run, store=store.url)
    with cat.session() as s:
        blobs, trees = referenced_blobs(s), referenced_trees(s)
        uids = set(s.scalars(select(SAEVersion.uid))) if mlflow else set()
    for sha, mtime in store.iter_blobs():
        if sha not in blobs and age_ok(mtime, min_age):
            report.blobs.append(sha)
    for tid, mtime in store.iter_trees():
        if tid not in trees and age_ok(mtime, min_age):
            report.trees.append(tid)
    report.temporary = [p for p, m in store.iter_tmp() if age_ok(m, min_age)]
    stale: list[tuple[str, str, str]] = []
    if mlflow:
        try:
            stale = cat.mirror.stale_versions(cat.catalog_id(), uids, min_age)
        except MirrorError as e:
            report.mlflow_error = str(e)
    report.mlflow_versions = [(name, version) for name, version, _ in stale]
    if dry_run:
        return report
    with collecting(cat.url):  # no registration in flight until this block ends
        with cat.session() as s:  # re-read: registrations may have committed meanwhile
            blobs, trees = referenced_blobs(s), referenced_trees(s)
            uids = set(s.scalars(select(SAEVersion.uid))) if stale else set()
        report.blobs = [b for b in report.blobs
                        if b not in blobs and age_ok(store.blob_mtime(b), min_age)]
        report.trees = [t for t in report.trees if t not in trees]
        for tid in report.trees:
            store.delete_tree(tid)
        for sha in report.blobs:
            store.delete_blob(sha)
        for path in report.temporary:  # written by registrations that have ended since
            store.delete_tmp(path)
    # Each attempt of a registration tags its MLflow version with a uid of its own; one that is
    # not in the catalog now, with no registration in flight, can never be committed.
    stale = [v for v in stale if v[2] not in uids]
    report.mlflow_versions = [(name, version) for name, version, _ in stale]
    for name, version, _ in stale:
        cat.mirror.delete_version(name, version)
    return report
