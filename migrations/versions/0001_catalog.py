"""Catalog: language models, SAEs, immutable versions with files, aliases with history,
features (one row per latent), tags and notes.

Revision ID: 0001_catalog
Revises:
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001_catalog"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    meta = op.create_table(
        "catalog_meta",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_catalog_meta"),
    )
    op.bulk_insert(meta, [{"key": "catalog_id", "value": uuid.uuid4().hex}])
    op.create_table(
        "language_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_language_models"),
        sa.UniqueConstraint("name", name="uq_language_models_name"),
    )
    op.create_table(
        "saes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("hook", sa.String(256), nullable=False),
        sa.Column("architecture", sa.String(32), nullable=False),
        sa.Column("d_in", sa.Integer(), nullable=False),
        sa.Column("d_sae", sa.Integer(), nullable=False),
        ts("created_at"),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_saes"),
        sa.UniqueConstraint("name", name="uq_saes_name"),
        sa.ForeignKeyConstraint(["model_id"], ["language_models.id"],
                                name="fk_saes_model_id_language_models"),
    )
    op.create_index("ix_saes_architecture", "saes", ["architecture"])
    op.create_index("ix_saes_model_id_hook", "saes", ["model_id", "hook"])
    op.create_table(
        "sae_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sae_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("uid", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("deprecation_reason", sa.Text(), nullable=True),
        ts("deprecated_at", nullable=True),
        sa.Column("deprecated_by", sa.String(128), nullable=True),
        sa.Column("config", JSON, nullable=False),
        sa.Column("params", JSON, nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("artifact_uri", sa.Text(), nullable=False),
        sa.Column("store_tree", sa.String(64), nullable=True),
        sa.Column("source_kind", sa.String(16), nullable=False),
        sa.Column("source_uri", sa.Text(), nullable=False),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("mlflow_model_version", sa.String(32), nullable=True),
        sa.Column("dataset", sa.Text(), nullable=True),
        sa.Column("training_tokens", sa.BigInteger(), nullable=True),
        sa.Column("context_size", sa.Integer(), nullable=True),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        ts("created_at"),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sae_versions"),
        sa.UniqueConstraint("sae_id", "number", name="uq_sae_versions_sae_id_number"),
        sa.UniqueConstraint("uid", name="uq_sae_versions_uid"),
        sa.CheckConstraint("status IN ('ready', 'deprecated')",
                           name=op.f("ck_sae_versions_status")),
        sa.CheckConstraint("number > 0", name=op.f("ck_sae_versions_number_positive")),
        sa.ForeignKeyConstraint(["sae_id"], ["saes.id"], name="fk_sae_versions_sae_id_saes"),
        sa.ForeignKeyConstraint(["parent_id"], ["sae_versions.id"],
                                name="fk_sae_versions_parent_id_sae_versions"),
    )
    op.create_index("ix_sae_versions_mlflow_run_id", "sae_versions", ["mlflow_run_id"])
    op.create_table(
        "version_files",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("version_id", "name", name="pk_version_files"),
        sa.ForeignKeyConstraint(["version_id"], ["sae_versions.id"],
                                name="fk_version_files_version_id_sae_versions"),
    )
    op.create_index("ix_version_files_sha256", "version_files", ["sha256"])
    op.create_table(
        "aliases",
        sa.Column("sae_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        ts("updated_at"),
        sa.Column("updated_by", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("sae_id", "name", name="pk_aliases"),
        sa.ForeignKeyConstraint(["sae_id"], ["saes.id"], name="fk_aliases_sae_id_saes"),
        sa.ForeignKeyConstraint(["version_id"], ["sae_versions.id"],
                                name="fk_aliases_version_id_sae_versions"),
    )
    op.create_index("ix_aliases_version_id", "aliases", ["version_id"])
    op.create_table(
        "alias_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sae_id", sa.Integer(), nullable=False),
        sa.Column("alias", sa.String(64), nullable=False),
        sa.Column("action", sa.String(8), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=True),
        sa.Column("previous_version_id", sa.Integer(), nullable=True),
        ts("created_at"),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_alias_events"),
        sa.CheckConstraint("action IN ('set', 'unset')", name=op.f("ck_alias_events_action")),
        sa.ForeignKeyConstraint(["sae_id"], ["saes.id"], name="fk_alias_events_sae_id_saes"),
        sa.ForeignKeyConstraint(["version_id"], ["sae_versions.id"],
                                name="fk_alias_events_version_id_sae_versions"),
        sa.ForeignKeyConstraint(["previous_version_id"], ["sae_versions.id"],
                                name="fk_alias_events_previous_version_id_sae_versions"),
    )
    op.create_index("ix_alias_events_sae_id_id", "alias_events", ["sae_id", "id"])
    op.create_table(
        "features",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("feature_index", sa.Integer(), nullable=False),
        sa.Column("log10_firing_rate", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("version_id", "feature_index", name="pk_features"),
        sa.ForeignKeyConstraint(["version_id"], ["sae_versions.id"],
                                name="fk_features_version_id_sae_versions"),
    )
    op.create_table(
        "version_tags",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("version_id", "key", name="pk_version_tags"),
        sa.ForeignKeyConstraint(["version_id"], ["sae_versions.id"],
                                name="fk_version_tags_version_id_sae_versions"),
    )
    op.create_table(
        "version_notes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        ts("created_at"),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_version_notes"),
        sa.ForeignKeyConstraint(["version_id"], ["sae_versions.id"],
                                name="fk_version_notes_version_id_sae_versions"),
    )
    op.create_index("ix_version_notes_version_id", "version_notes", ["version_id"])


def downgrade() -> None:
    for table in ("version_notes", "version_tags", "features", "alias_events", "aliases",
                  "version_files", "sae_versions", "saes", "language_models", "catalog_meta"):
        op.drop_table(table)
