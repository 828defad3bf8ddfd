"""Feature catalog: analyze runs with per-feature statistics, append-only feature labels with
full-text search (SQLite FTS5 table kept by triggers; PostgreSQL GIN index on to_tsvector),
versioned steering presets and the runs made with them.

Revision ID: 0004_feature_catalog
Revises: 0003_publications
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004_feature_catalog"
down_revision = "0003_publications"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")
FTS = "feature_labels_fts"
PG_FTS_INDEX = "ix_feature_labels_text_tsv"


def _audit() -> list[sa.Column]:
    return [sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("created_by", sa.String(128), nullable=False)]


def upgrade() -> None:
    op.create_table(
        "stats_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("dataset", sa.Text(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("context_size", sa.Integer(), nullable=False),
        sa.Column("code_version", sa.String(64), nullable=False),
        sa.Column("params", JSON, nullable=False),
        *_audit(),
        sa.PrimaryKeyConstraint("id", name="pk_stats_runs"),
        sa.ForeignKeyConstraint(["version_id"], ["sae_versions.id"],
                                name="fk_stats_runs_version_id_sae_versions"),
    )
    op.create_index("ix_stats_runs_version_id", "stats_runs", ["version_id"])
    op.create_table(
        "feature_stats",
        sa.Column("stats_run_id", sa.Integer(), nullable=False),
        sa.Column("feature_index", sa.Integer(), nullable=False),
        sa.Column("firing_rate", sa.Float(), nullable=False),
        sa.Column("mean_activation", sa.Float(), nullable=False),
        sa.Column("max_activation", sa.Float(), nullable=False),
        sa.Column("flag", sa.String(8), nullable=True),
        *(sa.Column(c, JSON, nullable=False) for c in (
            "histogram", "top_examples", "interval_examples", "top_logits", "bottom_logits")),
        sa.PrimaryKeyConstraint("stats_run_id", "feature_index", name="pk_feature_stats"),
        sa.ForeignKeyConstraint(["stats_run_id"], ["stats_runs.id"],
                                name="fk_feature_stats_stats_run_id_stats_runs"),
        sa.CheckConstraint("flag IN ('dead', 'dense')", name=op.f("ck_feature_stats_flag")),
    )
    op.create_table(
        "feature_labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("feature_index", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("model", sa.String(256), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("supersedes_id", sa.Integer(), nullable=True),
        sa.Column("stats_run_id", sa.Integer(), nullable=True),
        sa.Column("detection_score", sa.Float(), nullable=True),
        *_audit(),
        sa.PrimaryKeyConstraint("id", name="pk_feature_labels"),
        sa.ForeignKeyConstraint(["version_id", "feature_index"],
                                ["features.version_id", "features.feature_index"],
                                name="fk_feature_labels_version_id_features"),
        sa.ForeignKeyConstraint(["supersedes_id"], ["feature_labels.id"],
                                name="fk_feature_labels_supersedes_id_feature_labels"),
        sa.ForeignKeyConstraint(["stats_run_id"], ["stats_runs.id"],
                                name="fk_feature_labels_stats_run_id_stats_runs"),
        sa.CheckConstraint("method IN ('human', 'heuristic', 'llm')",
                           name=op.f("ck_feature_labels_method")),
        sa.CheckConstraint("status IN ('candidate', 'accepted', 'rejected')",
                           name=op.f("ck_feature_labels_status")),
    )
    op.create_index("ix_feature_labels_version_id_feature_index", "feature_labels",
                    ["version_id", "feature_index"])
    if op.get_bind().dialect.name == "sqlite":
        op.execute(f"CREATE VIRTUAL TABLE {FTS} USING fts5(text, content='feature_labels', "
                   "content_rowid='id', tokenize='porter unicode61')")
        op.execute(f"CREATE TRIGGER feature_labels_ai AFTER INSERT ON feature_labels BEGIN "
                   f"INSERT INTO {FTS}(rowid, text) VALUES (new.id, new.text); END")
        op.execute(f"CREATE TRIGGER feature_labels_ad AFTER DELETE ON feature_labels BEGIN "
                   f"INSERT INTO {FTS}({FTS}, rowid, text) VALUES ('delete', old.id, old.text); END")
    elif op.get_bind().dialect.name == "postgresql":
        op.execute(f"CREATE INDEX {PG_FTS_INDEX} ON feature_labels "
                   "USING gin (to_tsvector('english', text))")
    op.create_table(
        "steering_presets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("features", JSON, nullable=False),
        sa.Column("generation", JSON, nullable=False),
        *_audit(),
        sa.PrimaryKeyConstraint("id", name="pk_steering_presets"),
        sa.ForeignKeyConstraint(["version_id"], ["sae_versions.id"],
                                name="fk_steering_presets_version_id_sae_versions"),
        sa.UniqueConstraint("name", "number", name="uq_steering_presets_name_number"),
        sa.CheckConstraint("method IN ('add', 'clamp')", name=op.f("ck_steering_presets_method")),
    )
    op.create_index("ix_steering_presets_version_id", "steering_presets", ["version_id"])
    op.create_table(
        "steering_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("preset_id", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("default_text", sa.Text(), nullable=False),
        sa.Column("steered_text", sa.Text(), nullable=False),
        *_audit(),
        sa.PrimaryKeyConstraint("id", name="pk_steering_runs"),
        sa.ForeignKeyConstraint(["preset_id"], ["steering_presets.id"],
                                name="fk_steering_runs_preset_id_steering_presets"),
    )
    op.create_index("ix_steering_runs_preset_id", "steering_runs", ["preset_id"])
    op.create_table(
        "feature_neighbors",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("feature_index", sa.Integer(), nullable=False),
        sa.Column("other_version_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("other_index", sa.Integer(), nullable=False),
        sa.Column("cosine", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("version_id", "feature_index", "other_version_id", "rank",
                                name="pk_feature_neighbors"),
        sa.ForeignKeyConstraint(["version_id"], ["sae_versions.id"],
                                name="fk_feature_neighbors_version_id_sae_versions"),
        sa.ForeignKeyConstraint(["other_version_id"], ["sae_versions.id"],
                                name="fk_feature_neighbors_other_version_id_sae_versions"),
    )
    op.create_table(
        "version_evals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("dataset", sa.Text(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("context_size", sa.Integer(), nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        *_audit(),
        sa.PrimaryKeyConstraint("id", name="pk_version_evals"),
        sa.ForeignKeyConstraint(["version_id"], ["sae_versions.id"],
                                name="fk_version_evals_version_id_sae_versions"),
    )
    op.create_index("ix_version_evals_version_id", "version_evals", ["version_id"])


def downgrade() -> None:
    op.drop_index("ix_version_evals_version_id", table_name="version_evals")
    op.drop_table("version_evals")
    op.drop_table("feature_neighbors")
    op.drop_index("ix_steering_runs_preset_id", table_name="steering_runs")
    op.drop_table("steering_runs")
    op.drop_index("ix_steering_presets_version_id", table_name="steering_presets")
    op.drop_table("steering_presets")
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS feature_labels_ai")
        op.execute("DROP TRIGGER IF EXISTS feature_labels_ad")
        op.execute(f"DROP TABLE IF EXISTS {FTS}")
    elif op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP INDEX IF EXISTS {PG_FTS_INDEX}")
    op.drop_index("ix_feature_labels_version_id_feature_index", table_name="feature_labels")
    op.drop_table("feature_labels")
    op.drop_table("feature_stats")
    op.drop_index("ix_stats_runs_version_id", table_name="stats_runs")
    op.drop_table("stats_runs")
