"""Label search on PostgreSQL: the full-text index reads a label with markup, paths and dotted
names split into words (``translate(text, '<>/.@', '     ')`` before ``to_tsvector``), so that
``div`` finds a label about ``'<div>'`` as it does on SQLite, whose tokenizer splits them;
PostgreSQL's own parser drops ``<div>`` as a tag, with what a ``<b>...</b>`` pair encloses.
Nothing changes on SQLite.

Revision ID: 0008_label_search_markup
Revises: 0007_feature_stats_overview
"""

from __future__ import annotations

from alembic import op

revision = "0008_label_search_markup"
down_revision = "0007_feature_stats_overview"
branch_labels = None
depends_on = None

INDEX = "ix_feature_labels_text_tsv"


def _index(document: str) -> None:
    op.execute(f"DROP INDEX IF EXISTS {INDEX}")
    op.execute(f"CREATE INDEX {INDEX} ON feature_labels USING gin ({document})")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _index("to_tsvector('english', translate(text, '<>/.@', '     '))")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _index("to_tsvector('english', text)")
