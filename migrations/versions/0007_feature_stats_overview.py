"""Version overview: two indexes on feature_stats, so that an SAE version's page reads index
entries instead of its stats rows (each holding examples, histogram and logits as JSON): the
counts per flag read (stats_run_id, flag), the most often firing live features walk
(stats_run_id, firing_rate, feature_index, flag, max_activation) backwards and stop at the
page's length.

Revision ID: 0007_feature_stats_overview
Revises: 0006_label_search_index
"""

from __future__ import annotations

from alembic import op

revision = "0007_feature_stats_overview"
down_revision = "0006_label_search_index"
branch_labels = None
depends_on = None

BY_FLAG = "ix_feature_stats_run_flag"
BY_RATE = "ix_feature_stats_run_rate"  # the full conventional name passes 63 characters


def upgrade() -> None:
    op.create_index(BY_FLAG, "feature_stats", ["stats_run_id", "flag"])
    op.create_index(BY_RATE, "feature_stats",
                    ["stats_run_id", "firing_rate", "feature_index", "flag", "max_activation"])


def downgrade() -> None:
    op.drop_index(BY_RATE, table_name="feature_stats")
    op.drop_index(BY_FLAG, table_name="feature_stats")
