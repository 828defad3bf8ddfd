"""Schema migrations of the catalog, driven programmatically (no alembic.ini at run time).

The scripts live in the ``saereg.migrations`` package (``env.py`` + ``versions/``); its
folder is Alembic's script location wherever the package is installed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData
from sqlalchemy.engine import Engine


@dataclass
class Revision:
    revision: str
    down_revision: str | None
    doc: str
    is_head: bool
    is_current: bool = False


def script_location() -> Path:
    import saereg.migrations

    return Path(saereg.migrations.__file__).resolve().parent


def target_metadata() -> MetaData:
    """The whole schema: the version tables and the feature-catalog tables, which share a Base."""
    from saereg.registry.catalog import feature_schema  # noqa: F401  (registers its tables)
    from saereg.registry.catalog.schema import Base

    return Base.metadata


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@functools.lru_cache(maxsize=1)
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision of the migration scripts (the one this version of the code needs)."""
    return _script().get_current_head()


def known_revisions() -> set[str]:
    return {s.revision for s in _script().walk_revisions()}


def upgrade_engine(engine: Engine, revision: str = "head") -> None:
    """Upgrade on one connection in one transaction (SQLite: holding the write lock)."""
    cfg = alembic_config()
    with engine.execution_options(saereg_write=True).begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade_engine(engine: Engine, revision: str = "-1") -> None:
    cfg = alembic_config()
    with engine.execution_options(saereg_write=True).begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database at ``engine`` is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def history(current: str | None = None) -> list[Revision]:
    """Every revision, oldest first."""
    head = head_revision()
    out = [Revision(s.revision, s.down_revision, " ".join((s.doc or "").split("\n\n")[0].split()),
                    s.revision == head, s.revision == current)
           for s in _script().walk_revisions()]
    return list(reversed(out))
