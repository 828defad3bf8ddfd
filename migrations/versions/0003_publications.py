"""Publications: every push of a version to a Hugging Face Hub repo (repo, path, tag, commit)
and every pull of one into this catalog, so re-pushing is a no-op and provenance is kept.

Revision ID: 0003_publications
Revises: 0002_key_metrics
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_publications"
down_revision = "0002_key_metrics"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "publications",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("direction", sa.String(8), nullable=False),
        sa.Column("repo", sa.String(256), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("revision", sa.String(256), nullable=False),
        sa.Column("commit", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_publications"),
        sa.ForeignKeyConstraint(["version_id"], ["sae_versions.id"],
                                name="fk_publications_version_id_sae_versions"),
        sa.UniqueConstraint("version_id", "direction", "repo", "path",
                            name="uq_publications_version_id_direction_repo_path"),
        sa.CheckConstraint("direction IN ('push', 'pull')", name=op.f("ck_publications_direction")),
    )
    op.create_index("ix_publications_repo_path", "publications", ["repo", "path"])


def downgrade() -> None:
    op.drop_index("ix_publications_repo_path", table_name="publications")
    op.drop_table("publications")
