"""Label search: an index on feature_labels (version_id, id), so that word search finds the
label-id range of an SAE version in two index lookups and reads only that range when a query
of common words is filtered by model, hook or SAE.

Revision ID: 0006_label_search_index
Revises: 0005_label_embeddings
"""

from __future__ import annotations

from alembic import op

revision = "0006_label_search_index"
down_revision = "0005_label_embeddings"
branch_labels = None
depends_on = None

INDEX = "ix_feature_labels_version_id_id"


def upgrade() -> None:
    op.create_index(INDEX, "feature_labels", ["version_id", "id"])


def downgrade() -> None:
    op.drop_index(INDEX, table_name="feature_labels")
