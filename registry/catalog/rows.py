"""Row-level helpers of catalog writes: who is writing, upserts, the bulk feature insert, key
metrics, publication records, and the MLflow changes of one transaction, undone when the
catalog side fails."""

from __future__ import annotations

import contextlib
import getpass
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from saereg.registry.catalog.mlflow_mirror import MlflowMirror
from saereg.registry.catalog.schema import KEY_METRICS, Feature, Publication, utcnow

T = TypeVar("T")


def current_user() -> str:
    try:
        return os.environ.get("SAEREG_USER") or getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "unknown"


def key_metrics(metrics: Mapping[str, float]) -> dict[str, float | None]:
    out = {}
    for column, names in KEY_METRICS.items():
        found = next((metrics[n] for n in names if metrics.get(n) is not None), None)
        out[column] = float(found) if found is not None else None
    return out


def insert_ignore(s: Session, table, values: dict, key: str | Sequence[str]) -> bool:
    """INSERT ... ON CONFLICT (key columns) DO NOTHING on PostgreSQL and SQLite; returns whether
    the row was inserted."""
    keys = [key] if isinstance(key, str) else list(key)
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:
        if s.scalar(select(table.c[keys[0]]).where(
                *(table.c[k] == values[k] for k in keys))) is not None:
            return False
        s.execute(insert(table).values(**values))
        return True
    result = s.execute(dialect_insert(table).values(**values)
                       .on_conflict_do_nothing(index_elements=keys))
    return bool(result.rowcount)


def insert_features(s: Session, version_id: int, d_sae: int,
                     rates: list[float] | None) -> None:
    """One row per latent, in bulk: COPY on PostgreSQL (psycopg 3), a driver-level executemany
    on SQLite, a Core executemany elsewhere."""
    rates = rates if rates is not None else [None] * d_sae
    conn = s.connection()
    raw = conn.connection.dbapi_connection
    if conn.dialect.name == "postgresql" and type(raw).__module__.split(".")[0] == "psycopg":
        null = "\\N"
        text = "".join(f"{version_id}\t{i}\t{null if r is None else repr(float(r))}\n"
                       for i, r in enumerate(rates))
        with raw.cursor() as cur, cur.copy("COPY features (version_id, feature_index, "
                                           "log10_firing_rate) FROM STDIN") as copy:
            copy.write(text)
        return
    rows = [(version_id, i, r) for i, r in enumerate(rates)]
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("INSERT INTO features (version_id, feature_index, "
                             "log10_firing_rate) VALUES (?, ?, ?)", rows)
        return
    s.execute(insert(Feature.__table__), [
        {"version_id": v, "feature_index": i, "log10_firing_rate": r} for v, i, r in rows])


def restore_tags(mirror: MlflowMirror, name: str, version: str, old: dict[str, str],
                  keys: list[str]) -> None:
    back = {k: old[k] for k in keys if k in old}
    if back:
        mirror.set_version_tags(name, version, back)
    gone = [k for k in keys if k not in old]
    if gone:
        mirror.delete_version_tags(name, version, gone)


def undo(fn) -> None:
    """Undo an MLflow change after the catalog side failed; a failure to undo is a warning."""
    if fn is None:
        return
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the original error is the one to raise
        from saereg.registry.errors import redact

        warnings.warn(f"could not undo the MLflow side after the catalog failed: {redact(e)}",
                      stacklevel=3)


class MirrorChanges:
    """The MLflow changes made inside one catalog transaction, each with its undo."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], object]] = []

    def apply(self, change: Callable[[], T], undo: Callable[[T], object]) -> T:
        """Make an MLflow change now; ``undo(result)`` reverts it if the transaction does not
        commit. A change that raises needs no undo (it rolls the transaction back). ``undo``
        runs after the rollback, so it reads plain values, not the session's ORM objects."""
        result = change()
        self._undo.append(lambda: undo(result))
        return result

    def undo_all(self) -> None:
        """Revert the changes made so far, newest first (a failure to revert is a warning)."""
        while self._undo:
            undo(self._undo.pop())


@contextlib.contextmanager
def mirrored(transaction: contextlib.AbstractContextManager[Session]
             ) -> Iterator[tuple[Session, MirrorChanges]]:
    """Run one catalog transaction with its MLflow changes: the caller locks and reads, makes
    the MLflow changes through :meth:`MirrorChanges.apply`, then writes the rows; if anything
    fails before the commit has succeeded (the commit included), the MLflow changes are undone
    and the error is raised."""
    changes = MirrorChanges()
    try:
        with transaction as s:
            yield s, changes
    except BaseException:
        changes.undo_all()
        raise


# -- publications ----------------------------------------------------------------------------

@dataclass(frozen=True)
class PublicationRecord:
    """A version published to (``push``) or pulled from (``pull``) a Hugging Face Hub repo: the
    folder in the repo, the revision asked for (a tag, branch or commit) and the commit."""

    direction: str
    repo: str
    path: str
    revision: str
    commit: str

    def __post_init__(self) -> None:
        if self.direction not in ("push", "pull"):
            raise ValueError(f"publication direction must be 'push' or 'pull', not "
                             f"{self.direction!r}")


def find_publication(s: Session, version_id: int, direction: str, repo: str,
                     path: str) -> PublicationRecord | None:
    row = s.scalar(select(Publication).where(
        Publication.version_id == version_id, Publication.direction == direction,
        Publication.repo == repo, Publication.path == path))
    if row is None:
        return None
    return PublicationRecord(row.direction, row.repo, row.path, row.revision, row.commit)


def add_publication(s: Session, version_id: int, pub: PublicationRecord) -> bool:
    """Record ``pub`` for the version unless that (direction, repo, path) is recorded already
    (by a concurrent writer, say); returns whether it was recorded now."""
    return insert_ignore(s, Publication.__table__, {
        "version_id": version_id, "direction": pub.direction, "repo": pub.repo,
        "path": pub.path, "revision": pub.revision, "commit": pub.commit,
        "created_at": utcnow(), "created_by": current_user()},
        ("version_id", "direction", "repo", "path"))
