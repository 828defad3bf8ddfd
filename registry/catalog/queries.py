"""Reading the catalog: resolving references, listing, showing, diffing, alias history.

Results are plain dataclasses, detached from any session.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, case, exists, func, select
from sqlalchemy.orm import Session, aliased, selectinload

from saereg.registry.catalog.schema import (Alias, AliasEvent, LanguageModel, SAERecord, SAEVersion,
                                            VersionFile, VersionTag)
from saereg.registry.catalog.store import StoredFile
from saereg.registry.errors import SAENotFoundError, UsageError, VersionNotFoundError
from saereg.registry.models import model_ids
from saereg.registry.refs import Ref, format_ref, parse_ref


@dataclass
class VersionInfo:
    """Everything the catalog knows about one version."""

    name: str
    number: int
    model: str
    hook: str
    architecture: str
    d_in: int
    d_sae: int
    status: str
    created_at: datetime
    created_by: str
    files: list[StoredFile]
    artifact_uri: str
    config: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    key_metrics: dict[str, float | None] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    notes: list[tuple[datetime, str, str]] = field(default_factory=list)
    deprecation_reason: str | None = None
    deprecated_at: datetime | None = None
    mlflow_run_id: str | None = None
    mlflow_model_version: str | None = None
    dataset: str | None = None
    training_tokens: int | None = None
    context_size: int | None = None
    parent: str | None = None
    source_kind: str = ""
    source_uri: str = ""
    uid: str = ""
    store_tree: str | None = None
    id: int = 0

    @property
    def ref(self) -> str:
        return format_ref(self.name, self.number)

    @property
    def deprecated(self) -> bool:
        return self.status == "deprecated"


@dataclass(slots=True)
class VersionRow:
    """One line of ``saereg sae list``."""

    name: str
    number: int
    model: str
    hook: str
    architecture: str
    d_sae: int
    status: str
    explained_variance: float | None
    l0: float | None
    ce_loss_score: float | None
    dead_fraction: float | None
    created_at: datetime
    aliases: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return format_ref(self.name, self.number)


@dataclass
class AliasEventInfo:
    alias: str
    action: str
    version: int | None
    previous: int | None
    at: datetime
    by: str


@dataclass
class VersionDiff:
    left: VersionInfo
    right: VersionInfo
    config: list[tuple[str, Any, Any]]      # only the keys that differ
    metrics: list[tuple[str, float | None, float | None]]  # every metric of either side
    same_weights: bool


def aware(dt: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every stored time is UTC."""
    return dt.replace(tzinfo=UTC) if dt is not None and dt.tzinfo is None else dt


def find_sae(s: Session, name: str, *, lock: bool = False) -> SAERecord:
    q = select(SAERecord).where(SAERecord.name == name)
    sae = s.scalar(q.with_for_update() if lock else q)
    if sae is None:
        raise SAENotFoundError(name, s.scalars(select(SAERecord.name).order_by(SAERecord.name)),
                               hint="see `saereg sae list`")
    return sae


def find_version(s: Session, ref: Ref | str, *, lock_sae: bool = False) -> SAEVersion:
    """The version a catalog reference names, or an error listing what exists."""
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    if ref.kind == "release":
        ref = parse_ref(pulled_release(s, ref))
    if ref.kind != "catalog":
        raise UsageError(f"{ref.text!r} is not a catalog reference (NAME, NAME@3, NAME@alias)")
    sae = find_sae(s, ref.name, lock=lock_sae)
    q = select(SAEVersion).where(SAEVersion.sae_id == sae.id)
    if ref.version is not None:
        q = q.where(SAEVersion.number == ref.version)
    elif ref.alias is not None:
        q = q.join(Alias, and_(Alias.version_id == SAEVersion.id, Alias.sae_id == sae.id,
                               Alias.name == ref.alias))
    else:
        q = q.order_by(case((SAEVersion.status == "ready", 0), else_=1),
                       SAEVersion.number.desc()).limit(1)
    version = s.scalar(q)
    if version is None:
        numbers = s.scalars(select(SAEVersion.number).where(SAEVersion.sae_id == sae.id))
        aliases = s.scalars(select(Alias.name).where(Alias.sae_id == sae.id))
        wanted = str(ref.version) if ref.version is not None else (ref.alias or "latest")
        raise VersionNotFoundError(ref.name, wanted, list(numbers), list(aliases))
    return version


RELEASE_TAG, SAE_ID_TAG = "saelens.release", "saelens.sae_id"
"""The tags a pull by release name records (see :mod:`saereg.registry.hub.release_pull`)."""


def release_tag(release: str) -> str:
    """The tag key that marks a version as SAE ``<value>`` of ``release`` (one per release: a
    repo folder that two releases name is one version, tagged by both)."""
    return f"saelens:{release}"


def pulled_release(s: Session, ref: Ref) -> str:
    """The newest version pulled from the release SAE that a ``saelens://`` reference names
    (``NAME@N``), or an error saying how to pull it."""
    from saereg.registry.errors import NotFoundError

    row = s.execute(
        select(SAERecord.name, SAEVersion.number).select_from(SAEVersion)
        .join(SAERecord, SAERecord.id == SAEVersion.sae_id)
        .join(VersionTag, and_(VersionTag.version_id == SAEVersion.id,
                               VersionTag.key == release_tag(ref.name),
                               VersionTag.value == ref.repo_path))
        .order_by(SAEVersion.created_at.desc(), SAEVersion.id.desc()).limit(1)).first()
    if row is None:
        raise NotFoundError("pulled release SAE", ref.text, hint="pull it first: saereg sync "
                            f"pull --release {ref.name} --sae-id {ref.repo_path}")
    return format_ref(row[0], row[1])


def version_info(s: Session, version_id: int) -> VersionInfo:
    v = s.scalars(select(SAEVersion).where(SAEVersion.id == version_id).options(
        selectinload(SAEVersion.sae).selectinload(SAERecord.model),
        selectinload(SAEVersion.files), selectinload(SAEVersion.tags),
        selectinload(SAEVersion.notes), selectinload(SAEVersion.parent))).one()
    aliases = s.scalars(select(Alias.name).where(Alias.version_id == v.id).order_by(Alias.name))
    parent = None
    if v.parent is not None:
        parent_name = s.scalar(select(SAERecord.name).where(SAERecord.id == v.parent.sae_id))
        parent = format_ref(parent_name, v.parent.number)
    return VersionInfo(
        id=v.id, uid=v.uid, name=v.sae.name, number=v.number, model=v.sae.model.name,
        hook=v.sae.hook, architecture=v.sae.architecture, d_in=v.sae.d_in, d_sae=v.sae.d_sae,
        status=v.status, created_at=aware(v.created_at), created_by=v.created_by,
        files=[StoredFile(f.name, f.sha256, f.size) for f in v.files],
        artifact_uri=v.artifact_uri, config=v.config or {}, params=v.params or {},
        metrics=v.metrics or {},
        key_metrics={"explained_variance": v.explained_variance, "l0": v.l0,
                     "ce_loss_score": v.ce_loss_score, "dead_fraction": v.dead_fraction},
        aliases=list(aliases), tags={t.key: t.value for t in v.tags},
        notes=[(aware(n.created_at), n.created_by, n.text) for n in v.notes],
        deprecation_reason=v.deprecation_reason, deprecated_at=aware(v.deprecated_at),
        mlflow_run_id=v.mlflow_run_id, mlflow_model_version=v.mlflow_model_version,
        dataset=v.dataset, training_tokens=v.training_tokens, context_size=v.context_size,
        parent=parent, source_kind=v.source_kind, source_uri=v.source_uri,
        store_tree=v.store_tree)


def _match(column, value: str):
    """Exact match, or a glob with ``*`` anywhere."""
    if "*" in value:
        escaped = value.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_")
        return column.like(escaped.replace("*", "%"), escape="\\")
    return column == value


def list_versions(s: Session, *, model: str | None = None, hook: str | None = None,
                  architecture: str | None = None, tags: dict[str, str | None] | None = None,
                  name: str | None = None, latest: bool = False,
                  include_deprecated: bool = True) -> list[VersionRow]:
    """Versions matching every filter, ordered by SAE name then number. A tag filter value of
    None matches any value of that key."""
    q = (select(SAERecord.name, SAEVersion.number, LanguageModel.name, SAERecord.hook,
                SAERecord.architecture, SAERecord.d_sae, SAEVersion.status,
                SAEVersion.explained_variance, SAEVersion.l0, SAEVersion.ce_loss_score,
                SAEVersion.dead_fraction, SAEVersion.created_at, SAEVersion.id)
         .join_from(SAEVersion, SAERecord, SAEVersion.sae_id == SAERecord.id)
         .join(LanguageModel, SAERecord.model_id == LanguageModel.id)
         .order_by(SAERecord.name, SAEVersion.number))
    if model and "*" in model:
        q = q.where(_match(LanguageModel.name, model))
    elif model:  # every recorded name of that model (saereg.registry.models)
        q = q.where(LanguageModel.id.in_(model_ids(s, model)))
    if hook:
        q = q.where(_match(SAERecord.hook, hook))
    if architecture:
        q = q.where(_match(SAERecord.architecture, architecture))
    if name:
        q = q.where(_match(SAERecord.name, name))
    if not include_deprecated:
        q = q.where(SAEVersion.status == "ready")
    for key, value in (tags or {}).items():
        cond = [VersionTag.version_id == SAEVersion.id, VersionTag.key == key]
        if value is not None:
            cond.append(VersionTag.value == value)
        q = q.where(exists().where(*cond))
    if latest:
        newer = aliased(SAEVersion)
        q = q.where(~exists().where(newer.sae_id == SAEVersion.sae_id,
                                    newer.number > SAEVersion.number))
    conn = s.connection()  # plain rows: no ORM result processing for thousands of lines
    by_version: dict[int, list[str]] = {}
    for vid, alias in conn.execute(select(Alias.version_id, Alias.name).order_by(Alias.name)):
        by_version.setdefault(vid, []).append(alias)
    with _gc_paused():
        return [VersionRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10],
                           aware(r[11]), by_version.get(r[12], [])) for r in conn.execute(q)]


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Building many small objects at once: skip the collector's passes over the whole heap
    meanwhile (they cost more than the work itself here)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def alias_history(s: Session, name: str) -> list[AliasEventInfo]:
    sae = find_sae(s, name)
    cur, prev = aliased(SAEVersion), aliased(SAEVersion)
    q = (select(AliasEvent.alias, AliasEvent.action, cur.number, prev.number,
                AliasEvent.created_at, AliasEvent.created_by)
         .outerjoin(cur, AliasEvent.version_id == cur.id)
         .outerjoin(prev, AliasEvent.previous_version_id == prev.id)
         .where(AliasEvent.sae_id == sae.id).order_by(AliasEvent.id))
    return [AliasEventInfo(a, act, n, p, aware(at), by) for a, act, n, p, at, by in s.execute(q)]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def lineage_fields(v: VersionInfo) -> dict[str, Any]:
    return {"model": v.model, "hook": v.hook, "architecture": v.architecture, "d_in": v.d_in,
            "d_sae": v.d_sae, "dataset": v.dataset, "training_tokens": v.training_tokens,
            "mlflow_run_id": v.mlflow_run_id, "parent": v.parent, "status": v.status}


def diff_versions(a: VersionInfo, b: VersionInfo) -> VersionDiff:
    left = {**{f"lineage.{k}": x for k, x in lineage_fields(a).items()},
            **flatten(a.config, "cfg."), **flatten(a.params, "params.")}
    right = {**{f"lineage.{k}": x for k, x in lineage_fields(b).items()},
             **flatten(b.config, "cfg."), **flatten(b.params, "params.")}
    skip = {"cfg.metadata.mlflow_run_id"}
    config = [(k, left.get(k), right.get(k)) for k in sorted(left.keys() | right.keys())
              if left.get(k) != right.get(k) and k not in skip]
    metrics = [(k, a.metrics.get(k), b.metrics.get(k))
               for k in sorted(a.metrics.keys() | b.metrics.keys())]
    weights = {f.name: f.sha256 for f in a.files}, {f.name: f.sha256 for f in b.files}
    same = weights[0].get("sae_weights.safetensors") == weights[1].get("sae_weights.safetensors")
    return VersionDiff(a, b, config, metrics, same)


def referenced_blobs(s: Session) -> set[str]:
    return set(s.scalars(select(VersionFile.sha256).distinct()))


def referenced_trees(s: Session) -> set[str]:
    return set(s.scalars(select(SAEVersion.store_tree).where(SAEVersion.store_tree.is_not(None))))


def count_versions(s: Session) -> int:
    return s.scalar(select(func.count()).select_from(SAEVersion)) or 0
