"""The catalog schema (SQLAlchemy 2.0 typed ORM).

A *language model* has SAEs; an *SAE* is a name bound to one model, hook point, architecture
and shape (d_in, d_sae); its *versions* are immutable (number unique per SAE, files with sha256
and size, config, metrics snapshot, lineage: MLflow run, dataset, tokens, parent); *aliases*
move between versions and keep an event history; *features* are one row per latent of a
version, keyed by (version_id, feature_index) so that per-feature statistics, labels and
presets can hang from them; *tags* and *notes* annotate versions.

The schema is created and changed only by the migrations in ``migrations/versions``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (JSON, BigInteger, CheckConstraint, DateTime, Float, ForeignKey, Index,
                        Integer, MetaData, String, Text, UniqueConstraint, event, inspect)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from saereg.registry.errors import SaeRegError

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
Json = JSON().with_variant(JSONB(), "postgresql")
STATUSES = ("ready", "deprecated")
KEY_METRICS: dict[str, tuple[str, ...]] = {
    # column on sae_versions -> metric names to take it from, first found wins
    "explained_variance": ("eval/explained_variance", "explained_variance"),
    "l0": ("eval/l0", "l0"),
    "ce_loss_score": ("eval/ce_loss_score", "ce_loss_score"),
    "dead_fraction": ("final/dead_fraction", "eval/dead_fraction", "dead_fraction"),
}
MUTABLE_VERSION_FIELDS = {"status", "deprecation_reason", "deprecated_at", "deprecated_by"}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class CatalogMeta(Base):
    """Facts about the catalog itself (``catalog_id``: a random id tagged on MLflow versions)."""

    __tablename__ = "catalog_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class LanguageModel(Base):
    __tablename__ = "language_models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(256), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    saes: Mapped[list[SAERecord]] = relationship(back_populates="model")


class SAERecord(Base):
    """A named SAE: the binding every one of its versions must match."""

    __tablename__ = "saes"
    __table_args__ = (Index(None, "model_id", "hook"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("language_models.id"))
    hook: Mapped[str] = mapped_column(String(256))
    architecture: Mapped[str] = mapped_column(String(32), index=True)
    d_in: Mapped[int] = mapped_column(Integer)
    d_sae: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))

    model: Mapped[LanguageModel] = relationship(back_populates="saes")
    versions: Mapped[list[SAEVersion]] = relationship(back_populates="sae",
                                                      order_by="SAEVersion.number")


class SAEVersion(Base):
    """One immutable version. Only the status fields (deprecation) ever change."""

    __tablename__ = "sae_versions"
    __table_args__ = (
        UniqueConstraint("sae_id", "number"),
        CheckConstraint("status IN ('ready', 'deprecated')", name="status"),
        CheckConstraint("number > 0", name="number_positive"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id"))
    number: Mapped[int] = mapped_column(Integer)
    uid: Mapped[str] = mapped_column(String(32), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="ready")
    deprecation_reason: Mapped[str | None] = mapped_column(Text)
    deprecated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    deprecated_by: Mapped[str | None] = mapped_column(String(128))
    config: Mapped[dict[str, Any]] = mapped_column(Json)
    params: Mapped[dict[str, Any]] = mapped_column(Json)
    metrics: Mapped[dict[str, Any]] = mapped_column(Json)
    explained_variance: Mapped[float | None] = mapped_column(Float)
    l0: Mapped[float | None] = mapped_column(Float)
    ce_loss_score: Mapped[float | None] = mapped_column(Float)
    dead_fraction: Mapped[float | None] = mapped_column(Float)
    artifact_uri: Mapped[str] = mapped_column(Text)
    store_tree: Mapped[str | None] = mapped_column(String(64))
    source_kind: Mapped[str] = mapped_column(String(16))
    source_uri: Mapped[str] = mapped_column(Text)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), index=True)
    mlflow_model_version: Mapped[str | None] = mapped_column(String(32))
    dataset: Mapped[str | None] = mapped_column(Text)
    training_tokens: Mapped[int | None] = mapped_column(BigInteger)
    context_size: Mapped[int | None] = mapped_column(Integer)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("sae_versions.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))

    sae: Mapped[SAERecord] = relationship(back_populates="versions")
    parent: Mapped[SAEVersion | None] = relationship(remote_side=[id])
    files: Mapped[list[VersionFile]] = relationship(order_by="VersionFile.name")
    tags: Mapped[list[VersionTag]] = relationship(order_by="VersionTag.key")
    notes: Mapped[list[VersionNote]] = relationship(order_by="VersionNote.id")


@event.listens_for(SAEVersion, "before_update")
def _versions_are_immutable(_mapper, _conn, target: SAEVersion) -> None:
    state = inspect(target)
    changed = [a.key for a in state.attrs
               if a.key not in MUTABLE_VERSION_FIELDS and a.history.has_changes()
               and a.key in SAEVersion.__table__.c]
    if changed:
        raise SaeRegError(f"versions are immutable; refusing to change {', '.join(changed)} "
                          "(register a new version instead)")


class VersionFile(Base):
    """A file of a version, stored content-addressed under its sha256."""

    __tablename__ = "version_files"
    version_id: Mapped[int] = mapped_column(ForeignKey("sae_versions.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)


class Alias(Base):
    """A movable name (``prod``, ``staging``) pointing at one version of an SAE."""

    __tablename__ = "aliases"
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("sae_versions.id"), index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(128))


class AliasEvent(Base):
    """Every alias move: set (with the version it left, if any) or unset."""

    __tablename__ = "alias_events"
    __table_args__ = (Index(None, "sae_id", "id"),
                      CheckConstraint("action IN ('set', 'unset')", name="action"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id"))
    alias: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(8))
    version_id: Mapped[int | None] = mapped_column(ForeignKey("sae_versions.id"))
    previous_version_id: Mapped[int | None] = mapped_column(ForeignKey("sae_versions.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))


class Feature(Base):
    """One latent of a version (made at registration). Statistics, labels and presets key on
    (version_id, feature_index)."""

    __tablename__ = "features"
    version_id: Mapped[int] = mapped_column(ForeignKey("sae_versions.id"), primary_key=True)
    feature_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    log10_firing_rate: Mapped[float | None] = mapped_column(Float)


class VersionTag(Base):
    __tablename__ = "version_tags"
    version_id: Mapped[int] = mapped_column(ForeignKey("sae_versions.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class VersionNote(Base):
    __tablename__ = "version_notes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("sae_versions.id"), index=True)
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))


class Publication(Base):
    """A version pushed to (or pulled from) a Hugging Face Hub repo: path in the repo, the
    revision (tag) and the commit it landed in."""

    __tablename__ = "publications"
    __table_args__ = (UniqueConstraint("version_id", "direction", "repo", "path"),
                      CheckConstraint("direction IN ('push', 'pull')", name="direction"),
                      Index(None, "repo", "path"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("sae_versions.id"))
    direction: Mapped[str] = mapped_column(String(8))
    repo: Mapped[str] = mapped_column(String(256))
    path: Mapped[str] = mapped_column(String(512))
    revision: Mapped[str] = mapped_column(String(256))
    commit: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))


