"""Row-level helpers of catalog writes: who is writing, upserts, the bulk feature insert, key
metrics, and undoing an MLflow change when the catalog side fails."""

from __future__ import annotations

import getpass
import os
import warnings
from collections.abc import Mapping

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from saereg.registry.catalog.mlflow_mirror import MlflowMirror
from saereg.registry.catalog.schema import KEY_METRICS, Feature


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


def insert_ignore(s: Session, table, values: dict, key: str) -> None:
    """INSERT ... ON CONFLICT (key) DO NOTHING on PostgreSQL and SQLite."""
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:
        if s.scalar(select(table.c[key]).where(table.c[key] == values[key])) is None:
            s.execute(insert(table).values(**values))
        return
    s.execute(dialect_insert(table).values(**values).on_conflict_do_nothing(index_elements=[key]))


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
        warnings.warn(f"could not undo the MLflow side after the catalog failed: {e}",
                      stacklevel=3)
