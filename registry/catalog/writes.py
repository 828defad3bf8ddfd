"""Writing the catalog: register versions, move aliases, deprecate, tag and annotate.

Every change to the catalog that has an MLflow counterpart runs in this order: open the
database transaction (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: ``SELECT ... FOR UPDATE`` on the
SAE row), make the MLflow change, write the rows, commit. An MLflow failure rolls the
transaction back; a database failure after the MLflow change (the commit included) undoes the
MLflow change. Every write goes through :meth:`Catalog._write`, which runs one such
transaction (:func:`saereg.registry.catalog.rows.mirrored`) and retries the whole attempt when
the database reports a lock timeout, a serialization failure or a deadlock.

A registration stores the files first (content-addressed, see :mod:`saereg.registry.catalog.store`); a
process that dies before the commit leaves only blobs that no version references, which
``saereg gc`` removes. Version numbers are allocated inside the locked transaction (max + 1,
with ``UNIQUE(sae_id, number)`` behind it), so they are distinct and gapless. What hangs from a
new version (its features, labels and statistics, and for a Hub pull its publication record)
is written in the version's own transaction: it lands with the version or not at all.

This class is the only writer of catalog rows; other modules (Hub sync among them) call its
public methods.
"""

from __future__ import annotations

import functools
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from saereg.registry.catalog import db
from saereg.registry.catalog import inflight
from saereg.registry.catalog import queries
from saereg.registry.catalog.mlflow_mirror import MlflowMirror
from saereg.registry.catalog.rows import (MirrorChanges, PublicationRecord, add_publication,
                                          current_user, find_publication, insert_features,
                                          insert_ignore, key_metrics, mirrored, restore_tags)
from saereg.registry.catalog.schema import (Alias, AliasEvent, CatalogMeta, LanguageModel,
                                            SAERecord, SAEVersion, VersionFile, VersionNote,
                                            VersionTag, utcnow)
from saereg.registry.catalog.sources import (Source, finite_metrics, given_metrics, read_folder,
                                             read_run)
from saereg.registry.catalog.store import ArtifactStore, default_store_url
from saereg.registry.errors import SAEMismatchError, SaeRegError, UsageError
from saereg.registry.refs import (Ref, format_ref, parse_ref, validate_alias, validate_name,
                                  validate_tag_key)

BINDING = ("model", "hook", "architecture", "d_in", "d_sae")
MAX_NOTE_CHARS = 5000
"""The longest version note, in characters: a registration's note is also the MLflow model
version's description, which MLflow's database holds in 5000 characters."""
T = TypeVar("T")


def check_note(text: str | None) -> None:
    """Refuse a version note longer than :data:`MAX_NOTE_CHARS` (None: no note)."""
    if text is not None and len(text) > MAX_NOTE_CHARS:
        raise UsageError(f"a note is at most {MAX_NOTE_CHARS} characters, got {len(text)}")


class DuplicateVersionError(SaeRegError):
    """A registration with ``same_files`` found, inside its write transaction, a version of the
    SAE that already holds those files; nothing was written. ``ref`` names that version."""

    def __init__(self, ref: str):
        self.ref = ref
        super().__init__(f"{ref} already holds these files; nothing was registered")


class Catalog:
    """The catalog at ``database_url`` (default: ``SAEREG_DATABASE_URL`` or the SQLite file in
    ``SAEREG_HOME``), storing new files in ``store_url`` and mirroring to MLflow at
    ``tracking_uri`` (default: ``saereg.registry.paths.mlflow_tracking_uri()``)."""

    def __init__(self, database_url: str | None = None, *, store_url: str | None = None,
                 tracking_uri: str | None = None):
        self.url = database_url or db.database_url()
        self.store_url = store_url or default_store_url()
        self.mirror = MlflowMirror(tracking_uri)

    @functools.cached_property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.store_url)

    def session(self, write: bool = False):
        return db.session(self.url, write=write)

    def catalog_id(self) -> str:
        with self.session() as s:
            return s.get(CatalogMeta, "catalog_id").value

    def _write(self, what: str, change: Callable[[Session, MirrorChanges], T]) -> T:
        """Run ``change(session, mlflow)`` as one write transaction, retried whole while the
        database is busy. ``change`` locks and reads, makes its MLflow changes through
        ``mlflow.apply(change, undo)``, then writes rows; if the transaction does not commit,
        those MLflow changes are undone."""
        def attempt() -> T:
            with mirrored(self.session(write=True)) as (s, mlflow):
                return change(s, mlflow)

        return db.retrying(attempt, what=what)

    # -- reading ------------------------------------------------------------------------------
    def get(self, ref: str | Ref) -> queries.VersionInfo:
        """The version ``ref`` names (NAME, NAME@3, NAME@alias)."""
        with self.session() as s:
            return queries.version_info(s, queries.find_version(s, ref).id)

    def list(self, **filters) -> list[queries.VersionRow]:
        """See :func:`saereg.registry.catalog.queries.list_versions` for the filters."""
        with self.session() as s:
            return queries.list_versions(s, **filters)

    def diff(self, a: str, b: str) -> queries.VersionDiff:
        return queries.diff_versions(self.get(a), self.get(b))

    def alias_history(self, name: str) -> list[queries.AliasEventInfo]:
        with self.session() as s:
            return queries.alias_history(s, name)

    # -- registering --------------------------------------------------------------------------
    def register_run(self, run_id: str, name: str, *, tags: Mapping[str, str] | None = None,
                     note: str | None = None, parent: str | None = None) -> queries.VersionInfo:
        """Register the SAE folder a training run logged as its ``sae/`` artifact (its NaN or
        infinite metrics are not copied: :func:`.sources.finite_metrics`)."""
        check_note(note)
        self._precheck(name, tags, parent)
        with tempfile.TemporaryDirectory(prefix="saereg-run-") as tmp:
            src = read_run(self.mirror.client, run_id, Path(tmp))
            return self._register(src, name, tags=tags, note=note, parent=parent)

    def register_folder(self, path: str | Path, name: str, *, model: str | None = None,
                        hook: str | None = None, tags: Mapping[str, str] | None = None,
                        note: str | None = None, parent: str | None = None,
                        metrics: Mapping[str, float] | None = None,
                        link_run: bool = True) -> queries.VersionInfo:
        """Register an SAE folder (this project's or SAELens's layout).

        With ``link_run`` (default), a run named in ``cfg.json`` (``metadata.mlflow_run_id``)
        that exists in the tracking store is recorded as lineage and its params and final
        metrics are copied; the MLflow model version still points at the stored files.

        A non-finite entry of ``metrics`` is refused, naming it; the linked run's NaN or
        infinite metrics are dropped with a warning (:mod:`.sources` states the rule).
        """
        given = given_metrics(metrics)
        check_note(note)
        self._precheck(name, tags, parent)
        src = read_folder(path, model=model, hook=hook)
        run_id = (src.cfg.get("metadata") or {}).get("mlflow_run_id")
        if link_run and run_id:
            self._link_run(src, str(run_id))
        src.metrics.update(given)
        return self._register(src, name, tags=tags, note=note, parent=parent)

    def register_source(self, src: Source, name: str, *, tags: Mapping[str, str] | None = None,
                        note: str | None = None, parent: str | None = None,
                        extra: Callable[[Session, int], None] | None = None,
                        publication: PublicationRecord | None = None,
                        same_files: Mapping[str, str] | None = None) -> queries.VersionInfo:
        """Register a source already read (:mod:`saereg.registry.catalog.sources`), as Hub pull
        does. ``extra(session, version_id)`` writes rows that hang from the new version
        (features, labels, statistics) and ``publication`` is recorded for it; both land in the
        version's own transaction, so the version is never there without them. With
        ``same_files`` (file name -> sha256), a version of ``name`` that already holds those
        files, seen inside the write transaction, makes it write nothing and raise
        :class:`DuplicateVersionError` (so two registrations of the same files add one)."""
        check_note(note)
        self._precheck(name, tags, parent)
        return self._register(src, name, tags=tags, note=note, parent=parent, extra=extra,
                              publication=publication, same_files=same_files)

    def _link_run(self, src: Source, run_id: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            run = self.mirror.client.get_run(run_id)
        except MlflowException:
            return  # trained elsewhere: the id stays in cfg.json metadata only
        src.run_id = run_id
        src.params = dict(run.data.params)
        src.metrics = {k: float(v) for k, v in run.data.metrics.items()}

    def _precheck(self, name: str, tags: Mapping[str, str] | None, parent: str | None) -> None:
        """Refuse bad input before anything is stored."""
        validate_name(name)
        for key in tags or {}:
            validate_tag_key(key)
        if parent is not None:
            ref = parse_ref(parent)
            with self.session() as s:
                queries.find_version(s, ref)
        # Open the MLflow stores now: an unreachable MLflow fails before anything is stored,
        # and a fresh process does not spend its first MLflow call under the catalog's lock.
        self.mirror.warm()

    def _check_binding(self, s: Session, name: str, src: Source) -> SAERecord | None:
        sae = s.scalar(select(SAERecord).where(SAERecord.name == name))
        if sae is None:
            return None
        have = {"model": sae.model.name, "hook": sae.hook, "architecture": sae.architecture,
                "d_in": sae.d_in, "d_sae": sae.d_sae}
        want = {k: getattr(src, k) for k in BINDING}
        if have != want:
            fmt = lambda d: ", ".join(f"{k}={d[k]}" for k in BINDING)  # noqa: E731
            raise SAEMismatchError(f"SAE {name!r} is bound to {fmt(have)}; this one has "
                                   f"{fmt(want)}. Register it under another name")
        return sae

    @inflight.registration  # from the first stored file to the commit, gc keeps off
    def _register(self, src: Source, name: str, *, tags: Mapping[str, str] | None,
                  note: str | None, parent: str | None,
                  extra: Callable[[Session, int], None] | None = None,
                  publication: PublicationRecord | None = None,
                  same_files: Mapping[str, str] | None = None) -> queries.VersionInfo:
        """Store the files, then record the version (with ``extra(session, version_id)``, rows
        that hang from it, and ``publication``) in one transaction, mirrored to MLflow."""
        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        src.metrics = finite_metrics(src.metrics, f"MLflow run {src.run_id}" if src.run_id
                                     else src.uri)
        with self.session() as s:
            self._check_binding(s, name, src)
            parent_id = queries.find_version(s, parent).id if parent else None
        store = self.store
        stored = [store.put(src.folder / f, f) for f in src.files]
        tree = store.put_tree(stored) if src.kind != "mlflow-run" else None
        mlflow_source = src.uri if tree is None else store.tree_url(tree)
        user, rates = current_user(), src.log10_rates

        def attempt(s: Session, mlflow: MirrorChanges) -> int:
            uid = uuid.uuid4().hex  # per attempt: an MLflow version left by one is told apart
            insert_ignore(s, LanguageModel.__table__,
                          {"name": src.model, "created_at": utcnow()}, "name")
            model_id = s.scalar(select(LanguageModel.id)
                                .where(LanguageModel.name == src.model))
            insert_ignore(s, SAERecord.__table__, {
                "name": name, "model_id": model_id, "hook": src.hook,
                "architecture": src.architecture, "d_in": src.d_in, "d_sae": src.d_sae,
                "created_at": utcnow(), "created_by": user}, "name")
            sae = queries.find_sae(s, name, lock=True)
            self._check_binding(s, name, src)
            if same_files:  # checked under the SAE's lock, so the check and the write agree
                same = s.scalar(select(func.min(SAEVersion.number)).where(
                    SAEVersion.sae_id == sae.id, *(SAEVersion.id.in_(
                        select(VersionFile.version_id).where(VersionFile.name == f,
                                                             VersionFile.sha256 == sha))
                        for f, sha in same_files.items())))
                if same is not None:
                    raise DuplicateVersionError(format_ref(name, same))
            number = (s.scalar(select(func.max(SAEVersion.number))
                               .where(SAEVersion.sae_id == sae.id)) or 0) + 1
            catalog_id = s.get(CatalogMeta, "catalog_id").value
            made = mlflow.apply(
                lambda: self.mirror.create_version(
                    name, mlflow_source, src.run_id, description=note or "",
                    tags={**tags, "saereg.catalog": catalog_id, "saereg.uid": uid,
                          "saereg.version": str(number), "model": src.model,
                          "hook": src.hook, "architecture": src.architecture}),
                undo=lambda mv: self.mirror.delete_version(name, mv[0], drop_model=mv[1]))
            version = SAEVersion(
                sae_id=sae.id, number=number, uid=uid, status="ready", config=src.cfg,
                params=src.params, metrics=src.metrics, **key_metrics(src.metrics),
                artifact_uri=store.url, store_tree=tree, source_kind=src.kind,
                source_uri=src.uri, mlflow_run_id=src.run_id,
                mlflow_model_version=made[0], dataset=src.dataset,
                training_tokens=src.training_tokens, context_size=src.context_size,
                parent_id=parent_id, created_at=utcnow(), created_by=user)
            s.add(version)
            s.flush()
            vid = version.id
            s.execute(insert(VersionFile.__table__), [
                {"version_id": vid, "name": f.name, "sha256": f.sha256, "size": f.size}
                for f in stored])
            insert_features(s, vid, src.d_sae, rates)
            if extra is not None:
                extra(s, vid)
            if tags:
                s.execute(insert(VersionTag.__table__), [
                    {"version_id": vid, "key": k, "value": v} for k, v in tags.items()])
            if note:
                s.add(VersionNote(version_id=vid, text=note, created_at=utcnow(),
                                  created_by=user))
            if publication is not None:
                add_publication(s, vid, publication)
            return number

        number = self._write(f"registering {name}", attempt)
        return self.get(format_ref(name, number))

    # -- aliases, deprecation, tags, notes ----------------------------------------------------
    def set_alias(self, name: str, alias: str, target: int | str) -> queries.VersionInfo:
        """Point ``alias`` at version ``target`` (a number, another alias, or ``latest``)."""
        validate_alias(alias)
        ref = parse_ref(f"{name}@{target}")

        def attempt(s: Session, mlflow: MirrorChanges) -> int:
            version = queries.find_version(s, ref, lock_sae=True)
            if version.status != "ready":
                raise UsageError(f"{format_ref(name, version.number)} is deprecated "
                                 f"({version.deprecation_reason}); aliases point at ready "
                                 "versions only")
            row = s.get(Alias, (version.sae_id, alias))
            if row is not None and row.version_id == version.id:
                return version.number
            prev = s.get(SAEVersion, row.version_id) if row is not None else None
            back = (functools.partial(self.mirror.set_alias, name, alias,
                                      prev.mlflow_model_version) if prev is not None
                    else functools.partial(self.mirror.delete_alias, name, alias))
            mlflow.apply(lambda: self.mirror.set_alias(name, alias, version.mlflow_model_version),
                         undo=lambda _: back())
            user = current_user()
            if row is None:
                s.add(Alias(sae_id=version.sae_id, name=alias, version_id=version.id,
                            updated_at=utcnow(), updated_by=user))
            else:
                row.version_id, row.updated_at, row.updated_by = version.id, utcnow(), user
            s.add(AliasEvent(sae_id=version.sae_id, alias=alias, action="set",
                             version_id=version.id,
                             previous_version_id=prev.id if prev is not None else None,
                             created_at=utcnow(), created_by=user))
            return version.number

        number = self._write(f"setting alias {alias} of {name}", attempt)
        return self.get(format_ref(name, number))

    def unset_alias(self, name: str, alias: str) -> int:
        """Remove ``alias``; returns the version it pointed at."""
        def attempt(s: Session, mlflow: MirrorChanges) -> int:
            sae = queries.find_sae(s, name, lock=True)
            row = s.get(Alias, (sae.id, alias))
            if row is None:  # raises the error that lists versions and aliases
                queries.find_version(s, Ref("catalog", name=name, alias=alias,
                                            text=f"{name}@{alias}"))
            version = s.get(SAEVersion, row.version_id)
            mv = version.mlflow_model_version  # a plain value: the undo runs after the rollback
            mlflow.apply(lambda: self.mirror.delete_alias(name, alias),
                         undo=lambda _: self.mirror.set_alias(name, alias, mv))
            s.delete(row)
            s.add(AliasEvent(sae_id=sae.id, alias=alias, action="unset",
                             previous_version_id=version.id, created_at=utcnow(),
                             created_by=current_user()))
            return version.number

        return self._write(f"removing alias {alias} of {name}", attempt)

    def deprecate(self, ref: str, reason: str) -> queries.VersionInfo:
        """Mark a version deprecated (it stays loadable, with a warning). Versions are never
        deleted: others may have pulled them."""
        if not reason or not reason.strip():
            raise UsageError("deprecating needs a reason (what to use instead, what is wrong)")
        keys = ["saereg.status", "saereg.deprecation_reason"]

        def attempt(s: Session, mlflow: MirrorChanges) -> tuple[str, int]:
            version = queries.find_version(s, ref, lock_sae=True)
            name, mv = version.sae.name, version.mlflow_model_version
            if version.status == "deprecated":
                raise UsageError(f"{format_ref(name, version.number)} is already deprecated "
                                 f"({version.deprecation_reason})")
            mlflow.apply(lambda: self.mirror.set_version_tags(name, mv, {
                             "saereg.status": "deprecated", "saereg.deprecation_reason": reason}),
                         undo=lambda _: self.mirror.delete_version_tags(name, mv, keys))
            version.status, version.deprecation_reason = "deprecated", reason.strip()
            version.deprecated_at, version.deprecated_by = utcnow(), current_user()
            return name, version.number

        name, number = self._write(f"deprecating {ref}", attempt)
        return self.get(format_ref(name, number))

    def tag(self, ref: str, tags: Mapping[str, str]) -> queries.VersionInfo:
        """Set tags on a version (catalog and MLflow model version)."""
        for key in tags:
            validate_tag_key(key)

        def attempt(s: Session, mlflow: MirrorChanges) -> tuple[str, int]:
            version = queries.find_version(s, ref, lock_sae=True)
            name, mv = version.sae.name, version.mlflow_model_version
            old = {t.key: t.value for t in version.tags}
            mlflow.apply(lambda: self.mirror.set_version_tags(name, mv, dict(tags)),
                         undo=lambda _: restore_tags(self.mirror, name, mv, old, list(tags)))
            for key, value in tags.items():
                row = s.get(VersionTag, (version.id, key))
                if row is None:
                    s.add(VersionTag(version_id=version.id, key=key, value=str(value)))
                else:
                    row.value = str(value)
            return name, version.number

        name, number = self._write(f"tagging {ref}", attempt)
        return self.get(format_ref(name, number))

    def add_note(self, ref: str, text: str) -> queries.VersionInfo:
        """Append a note to a version (catalog only; notes are never edited), at most
        :data:`MAX_NOTE_CHARS` characters."""
        if not text.strip():
            raise UsageError("empty note")
        check_note(text)

        def attempt(s: Session, _mlflow: MirrorChanges) -> tuple[str, int]:
            version = queries.find_version(s, ref)
            s.add(VersionNote(version_id=version.id, text=text, created_at=utcnow(),
                              created_by=current_user()))
            return version.sae.name, version.number

        name, number = self._write(f"adding a note to {ref}", attempt)
        return self.get(format_ref(name, number))

    def add_feature_data(self, ref: str, change: Callable[[Session, int], T], *,
                         what: str) -> T:
        """Run ``change(session, version_id)`` for version ``ref`` as one write transaction,
        retried whole while the database is busy: statistics and labels that arrive for a
        version already recorded (a pull's features.parquet). ``change`` writes feature-catalog
        rows only; the version itself does not change. The SAE's row is locked first, so two
        such changes of one SAE (two pulls at once) run one after the other and the second
        sees what the first added."""
        def attempt(s: Session, _mlflow: MirrorChanges) -> T:
            return change(s, queries.find_version(s, ref, lock_sae=True).id)

        return self._write(what, attempt)

    # -- publications -------------------------------------------------------------------------
    def find_publication(self, ref: str, direction: str, repo: str,
                         path: str) -> PublicationRecord | None:
        """The recorded push (or pull) of version ``ref`` to (from) Hub repo ``repo`` at folder
        ``path``, if any."""
        with self.session() as s:
            version = queries.find_version(s, ref)
            return find_publication(s, version.id, direction, repo, path)

    def record_publication(self, ref: str, publication: PublicationRecord) -> bool:
        """Record that version ``ref`` was pushed to (or pulled from) a Hub repo; a record of
        the same version, direction, repo and path already there is kept as it is. Returns
        whether it was recorded now. A push calls this once the Hub commit and tag exist."""
        def attempt(s: Session, _mlflow: MirrorChanges) -> bool:
            version = queries.find_version(s, ref)
            return add_publication(s, version.id, publication)

        return self._write(f"recording the {publication.direction} of {ref} "
                           f"({publication.repo})", attempt)
