"""Key metrics as columns of sae_versions (explained variance, L0, CE-loss score, dead
fraction), filled from each version's metrics snapshot, so listing and sorting never parse
JSON.

Revision ID: 0002_key_metrics
Revises: 0001_catalog
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0002_key_metrics"
down_revision = "0001_catalog"
branch_labels = None
depends_on = None

# Frozen copy (a migration must not change when the application code does).
KEY_METRICS = {
    "explained_variance": ("eval/explained_variance", "explained_variance"),
    "l0": ("eval/l0", "l0"),
    "ce_loss_score": ("eval/ce_loss_score", "ce_loss_score"),
    "dead_fraction": ("final/dead_fraction", "eval/dead_fraction", "dead_fraction"),
}


def upgrade() -> None:
    with op.batch_alter_table("sae_versions") as batch:
        for column in KEY_METRICS:
            batch.add_column(sa.Column(column, sa.Float(), nullable=True))
    versions = sa.table("sae_versions", sa.column("id", sa.Integer()),
                        sa.column("metrics", sa.JSON()),
                        *(sa.column(c, sa.Float()) for c in KEY_METRICS))
    conn = op.get_bind()
    rows = conn.execute(sa.select(versions.c.id, versions.c.metrics)).all()
    for vid, metrics in rows:
        if isinstance(metrics, str):
            metrics = json.loads(metrics)
        values = {}
        for column, names in KEY_METRICS.items():
            found = next((metrics[n] for n in names if metrics.get(n) is not None), None)
            values[column] = float(found) if found is not None else None
        if any(v is not None for v in values.values()):
            conn.execute(versions.update().where(versions.c.id == vid).values(**values))


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35): a batch copy of sae_versions would
    # drop a table other tables reference while foreign keys are enforced.
    for column in reversed(list(KEY_METRICS)):
        op.execute(f"ALTER TABLE sae_versions DROP COLUMN {column}")
