"""Label embeddings: one sentence embedding per label and embedding model (float32 bytes), for
search by meaning. The index over them is built in the reading process (no pgvector needed).

Revision ID: 0005_label_embeddings
Revises: 0004_feature_catalog
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_label_embeddings"
down_revision = "0004_feature_catalog"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "label_embeddings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("label_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_label_embeddings"),
        sa.ForeignKeyConstraint(["label_id"], ["feature_labels.id"],
                                name="fk_label_embeddings_label_id_feature_labels"),
        sa.UniqueConstraint("label_id", "model", name="uq_label_embeddings_label_id_model"),
    )


def downgrade() -> None:
    op.drop_table("label_embeddings")
