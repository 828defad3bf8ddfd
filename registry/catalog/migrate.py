"""Schema migrations of the catalog, driven programmatically (no alembic.ini at run time).

The scripts live in the ``saereg.migrations`` package (``env.py`` + ``versions/``); its
folder is Alembic's script location wherever the package is installed.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import MetaData, func, inspect, select, table
from sqlalchemy import column as sa_column
from sqlalchemy.engine import Connection, Engine

from saereg.registry.errors import CatalogNotMigratedError, SchemaRevisionError


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


def known_revisions_text() -> str:
    """``base, 0001_..., ..., 0004_... (head)``: the revisions a command accepts, for messages."""
    head = head_revision()
    names = [r.revision + (" (head)" if r.revision == head else "") for r in history()]
    return ", ".join(["base", *names])


@contextlib.contextmanager
def _revision_errors(verb: str, revision: str, current: str | None) -> Iterator[None]:
    """Alembic's answer to a revision it cannot reach, as one :class:`SchemaRevisionError`."""
    if current is not None and current not in known_revisions():
        raise CatalogNotMigratedError(
            f"the catalog is at schema revision {current}, which this version of sae-registry "
            "does not know (it was made by a newer one); upgrade sae-registry to "
            f"{verb} it")
    try:
        yield
    except CommandError as e:
        reason = " ".join(str(e).split())
        what = (f"unknown schema revision {revision!r}" if reason.startswith("Can't locate")
                else f"cannot {verb} the catalog from {current or 'empty'} to {revision!r} "
                     f"({reason})")
        raise SchemaRevisionError(
            f"{what}; known revisions: {known_revisions_text()}; or a number of steps "
            f"({'-1, -2' if verb == 'downgrade' else '+1, +2'}, ...)") from None


def upgrade_engine(engine: Engine, revision: str = "head") -> None:
    """Upgrade on one connection in one transaction (SQLite: holding the write lock).

    Raises :class:`SchemaRevisionError` for a revision that does not exist or lies behind the
    catalog's."""
    cfg = alembic_config()
    with engine.execution_options(saereg_write=True).begin() as conn:
        cfg.attributes["connection"] = conn
        with _revision_errors("upgrade", revision, _current(conn)):
            command.upgrade(cfg, revision)


def downgrade_engine(engine: Engine, revision: str = "-1") -> None:
    """Downgrade to ``revision`` (a revision, ``base``, or ``-N`` steps) in one transaction.

    It drops what the undone steps created, rows included, without asking: see
    :func:`plan_downgrade` for what that is."""
    cfg = alembic_config()
    with engine.execution_options(saereg_write=True).begin() as conn:
        cfg.attributes["connection"] = conn
        with _revision_errors("downgrade", revision, _current(conn)):
            command.downgrade(cfg, revision)


@dataclass
class Drop:
    """A table, or a column of a table, that a downgrade removes, with the rows that hold data
    in it (every row of a table; the rows with a value, for a column)."""

    table: str
    column: str | None
    rows: int

    def __str__(self) -> str:
        rows = f"{self.rows} row{'s' * (self.rows != 1)}"
        if self.column is None:
            return f"table {self.table} ({rows})"
        return f"column {self.table}.{self.column} ({rows} with a value)"


@dataclass
class DowngradePlan:
    """What ``downgrade_engine(engine, revision)`` would do now."""

    current: str
    target: str | None  # None: base (an empty catalog)
    steps: list[str] = field(default_factory=list)  # the revisions undone, newest first
    drops: list[Drop] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(d.rows for d in self.drops)

    def summary(self) -> str:
        """One line: ``drops table a (3 rows), column b.c (1 row with a value)``."""
        if not self.drops:
            return "drops no table or column"
        return "drops " + ", ".join(str(d) for d in self.drops)


def _current(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def _catalog_columns(conn: Connection) -> dict[str, list[str]]:
    """The catalog's tables (those of the schema, not search indexes) and their columns."""
    insp = inspect(conn)
    wanted = target_metadata().tables
    return {t: [c["name"] for c in insp.get_columns(t)]
            for t in insp.get_table_names() if t in wanted}


def plan_downgrade(engine: Engine, revision: str = "-1") -> DowngradePlan:
    """The tables and columns that downgrading to ``revision`` drops, with their row counts.

    The downgrade is run for real inside a transaction that is then rolled back (both SQLite
    and PostgreSQL undo DDL with the transaction), so the plan is exactly what the scripts do.
    Raises :class:`SchemaRevisionError` as :func:`downgrade_engine` would."""
    cfg = alembic_config()
    with engine.execution_options(saereg_write=True).connect() as conn:
        with conn.begin() as trans:
            current = _current(conn)
            if current is None:
                raise SchemaRevisionError("the catalog is empty; there is nothing to downgrade")
            before = _catalog_columns(conn)
            cfg.attributes["connection"] = conn
            with _revision_errors("downgrade", revision, current):
                command.downgrade(cfg, revision)
            target, after = _current(conn), _catalog_columns(conn)
            trans.rollback()
        steps = [s.revision for s in _script().iterate_revisions(current, target or "base")]
        plan = DowngradePlan(current, target, steps)
        with conn.begin():
            for name, columns in before.items():
                if name not in after:
                    rows = conn.scalar(select(func.count()).select_from(table(name)))
                    plan.drops.append(Drop(name, None, rows))
                    continue
                for column in columns:
                    if column not in after[name]:
                        t = table(name, sa_column(column))
                        rows = conn.scalar(select(func.count()).select_from(t)
                                           .where(t.c[column].is_not(None)))
                        plan.drops.append(Drop(name, column, rows))
    plan.drops.sort(key=lambda d: (d.column is not None, d.table, d.column or ""))
    return plan


def current_revision(engine: Engine) -> str | None:
    """The revision the database at ``engine`` is at (None for an empty database)."""
    with engine.connect() as conn:
        return _current(conn)


def history(current: str | None = None) -> list[Revision]:
    """Every revision, oldest first."""
    head = head_revision()
    out = [Revision(s.revision, s.down_revision, " ".join((s.doc or "").split("\n\n")[0].split()),
                    s.revision == head, s.revision == current)
           for s in _script().walk_revisions()]
    return list(reversed(out))
