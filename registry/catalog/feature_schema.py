"""Catalog tables for studying features (revision 0004_feature_catalog).

A *stats run* is one analyze pass over text for one version (dataset, tokens, context size,
code version); its *feature stats* (one row per latent) never change and a new run never
replaces an old one. *Feature labels* are append-only: relabelling adds a row that
``supersedes`` the previous one of the same method, so the whole history stays; labels are
searched through SQLite FTS5 (table ``feature_labels_fts``, kept by triggers) or a PostgreSQL
full-text GIN index, both made by the migration only. *Steering presets* are versioned data
(name + version, unique); *steering runs* keep the default and steered continuations produced
with a preset version. *Label embeddings* hold one sentence embedding per label and embedding
model (float32 bytes, written by the analysis layer when it writes the label, or back-filled)
for search by meaning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from saereg.registry.catalog.schema import Base, Json, utcnow

LABEL_METHODS = ("human", "heuristic", "llm")
LABEL_STATUSES = ("candidate", "accepted", "rejected")
MAX_LABEL_CHARS = 2000
"""The longest label text, in characters (after runs of whitespace become one space)."""


def label_text_problem(text: str) -> str | None:
    """What is wrong with a label's text (already whitespace-normalised), or None: empty, over
    MAX_LABEL_CHARS, or holding a control character (NUL among them, which PostgreSQL refuses
    in text and which no label needs)."""
    if not text:
        return "a label needs some text"
    if len(text) > MAX_LABEL_CHARS:
        return f"a label is at most {MAX_LABEL_CHARS} characters, got {len(text)}"
    bad = next((c for c in text if ord(c) < 32 or 127 <= ord(c) < 160), None)
    if bad is not None:
        return f"a label may not hold control characters (found {bad!r})"
    return None

_L = TypeVar("_L")


def current_label(labels: Sequence[_L], status: Callable[[_L], str]) -> _L | None:
    """The label a feature goes by, from its labels oldest first: the newest accepted one,
    else the newest candidate (a rejected label never)."""
    for wanted in ("accepted", "candidate"):
        for lab in reversed(labels):
            if status(lab) == wanted:
                return lab
    return None
STEER_METHODS = ("add", "clamp")


class StatsRun(Base):
    """One analyze pass of a version over text."""

    __tablename__ = "stats_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("sae_versions.id"), index=True)
    dataset: Mapped[str] = mapped_column(Text)
    tokens: Mapped[int] = mapped_column(BigInteger)
    context_size: Mapped[int] = mapped_column(Integer)
    code_version: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(Json)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))


class FeatureStats(Base):
    """Statistics of one latent in one stats run. ``flag`` is 'dead', 'dense' or NULL."""

    __tablename__ = "feature_stats"
    __table_args__ = (
        CheckConstraint("flag IN ('dead', 'dense')", name="flag"),
        # a version's overview from index entries alone (migration 0007): counts per flag,
        # and the most often firing live features read backwards by rate
        Index("ix_feature_stats_run_flag", "stats_run_id", "flag"),
        Index("ix_feature_stats_run_rate", "stats_run_id", "firing_rate", "feature_index", "flag",
              "max_activation"),
    )
    stats_run_id: Mapped[int] = mapped_column(ForeignKey("stats_runs.id"), primary_key=True)
    feature_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    firing_rate: Mapped[float] = mapped_column(Float)
    mean_activation: Mapped[float] = mapped_column(Float)
    max_activation: Mapped[float] = mapped_column(Float)
    flag: Mapped[str | None] = mapped_column(String(8))
    histogram: Mapped[dict[str, Any]] = mapped_column(Json)
    top_examples: Mapped[list[Any]] = mapped_column(Json)
    interval_examples: Mapped[list[Any]] = mapped_column(Json)
    top_logits: Mapped[list[Any]] = mapped_column(Json)
    bottom_logits: Mapped[list[Any]] = mapped_column(Json)


class FeatureLabel(Base):
    """One label of a latent; never updated except its status and detection score."""

    __tablename__ = "feature_labels"
    __table_args__ = (
        ForeignKeyConstraint(["version_id", "feature_index"],
                             ["features.version_id", "features.feature_index"]),
        Index(None, "version_id", "feature_index"),
        Index(None, "version_id", "id"),  # label-id range of a version, for word search
        CheckConstraint("method IN ('human', 'heuristic', 'llm')", name="method"),
        CheckConstraint("status IN ('candidate', 'accepted', 'rejected')", name="status"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(Integer)
    feature_index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(16))
    model: Mapped[str | None] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16), default="candidate")
    supersedes_id: Mapped[int | None] = mapped_column(ForeignKey("feature_labels.id"))
    stats_run_id: Mapped[int | None] = mapped_column(ForeignKey("stats_runs.id"))
    detection_score: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))


class LabelEmbedding(Base):
    """The sentence embedding of one label by one embedding model: ``dim`` float32 values,
    little-endian, unit length (``vector``). Never updated; ``id`` only grows, so the newest
    row tells a reader whether anything was added."""

    __tablename__ = "label_embeddings"
    __table_args__ = (UniqueConstraint("label_id", "model"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("feature_labels.id"))
    model: Mapped[str] = mapped_column(String(128))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SteeringPreset(Base):
    """One version of a named steering preset (features with strengths, method, generation
    defaults) bound to one SAE version."""

    __tablename__ = "steering_presets"
    __table_args__ = (UniqueConstraint("name", "number"),
                      CheckConstraint("method IN ('add', 'clamp')", name="method"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    number: Mapped[int] = mapped_column(Integer)
    version_id: Mapped[int] = mapped_column(ForeignKey("sae_versions.id"), index=True)
    method: Mapped[str] = mapped_column(String(8))
    features: Mapped[list[Any]] = mapped_column(Json)
    generation: Mapped[dict[str, Any]] = mapped_column(Json)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))


class SteeringRun(Base):
    """A default and a steered continuation of one prompt, made with one preset version."""

    __tablename__ = "steering_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    preset_id: Mapped[int] = mapped_column(ForeignKey("steering_presets.id"), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(Integer)
    default_text: Mapped[str] = mapped_column(Text)
    steered_text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))


class FeatureNeighbor(Base):
    """The nearest features of a latent by decoder cosine, within its own version or in another
    version on the same model and hook, stored once computed (rank 1 = nearest)."""

    __tablename__ = "feature_neighbors"
    version_id: Mapped[int] = mapped_column(ForeignKey("sae_versions.id"), primary_key=True)
    feature_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    other_version_id: Mapped[int] = mapped_column(ForeignKey("sae_versions.id"),
                                                  primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    other_index: Mapped[int] = mapped_column(Integer)
    cosine: Mapped[float] = mapped_column(Float)


class VersionEval(Base):
    """One run of the evaluation suite on held-out text for a version (versions themselves are
    immutable, so evaluations hang from them)."""

    __tablename__ = "version_evals"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("sae_versions.id"), index=True)
    dataset: Mapped[str] = mapped_column(Text)
    tokens: Mapped[int] = mapped_column(BigInteger)
    context_size: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(Json)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))
