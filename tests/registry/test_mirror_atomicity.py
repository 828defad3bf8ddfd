"""Catalog and MLflow Model Registry never disagree, with real failures on each side. MLflow
unreachable, or MLflow refusing the version inside the transaction: no catalog row. The
database refusing the write after MLflow accepted it (a trigger, a real constraint of the real
database): the MLflow version, alias move or tag is undone. A process killed after the MLflow
write but before the commit leaves an MLflow version that `gc` removes once it is old enough."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from catalog_helpers import make_sae_folder, table_counts
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from saereg.registry.api import gc
from saereg.registry.catalog import db
from saereg.registry.catalog.writes import Catalog
from saereg.registry.errors import MirrorError


def add_trigger(backend: str, table: str, when: str = "INSERT", body: str | None = None) -> None:
    """A trigger that refuses (or, with ``body``, stalls) every ``when`` on ``table``."""
    with db.get_engine().begin() as conn:
        if backend == "sqlite":
            stmt = body or "SELECT RAISE(ABORT, 'refused by a test trigger')"
            conn.execute(text(f"CREATE TRIGGER refuse_{table} BEFORE {when} ON {table} "
                              f"BEGIN {stmt}; END"))
        else:
            stmt = body or "RAISE EXCEPTION 'refused by a test trigger'"
            conn.execute(text(f"CREATE OR REPLACE FUNCTION refuse_{table}() RETURNS trigger AS "
                              f"$$ BEGIN {stmt}; RETURN NEW; END $$ LANGUAGE plpgsql"))
            conn.execute(text(f"CREATE TRIGGER refuse_{table} BEFORE {when} ON {table} "
                              f"FOR EACH ROW EXECUTE FUNCTION refuse_{table}()"))


def drop_trigger(backend: str, table: str) -> None:
    with db.get_engine().begin() as conn:
        if backend == "sqlite":
            conn.execute(text(f"DROP TRIGGER refuse_{table}"))
        else:
            conn.execute(text(f"DROP TRIGGER refuse_{table} ON {table}"))
            conn.execute(text(f"DROP FUNCTION refuse_{table}()"))


def test_unreachable_mlflow_writes_nothing(backend, mlflow_store, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cat = Catalog(tracking_uri="http://user:secret@127.0.0.1:9/")  # nothing listens there
    with pytest.raises(MirrorError, match=r"MLflow model registry at http://user:\*\*\*@127.0.0.1:9/") as e:
        cat.register_folder(make_sae_folder(tmp_path / "s"), "offline")
    assert "secret" not in str(e.value)
    assert set(table_counts().values()) == {0}
    assert not any(True for _ in cat.store.iter_blobs())  # it failed before storing anything


def test_mlflow_refusal_inside_the_transaction_rolls_back(catalog, mlflow_store, tmp_path):
    folder = make_sae_folder(tmp_path / "s")
    too_long = {"comment": "x" * 100_001}  # MLflow's limit on model version tag values
    with pytest.raises(MirrorError, match="registering a version of 'refused'"):
        catalog.register_folder(folder, "refused", tags=too_long)
    assert set(table_counts().values()) == {0}
    assert mlflow_store.search_registered_models() == []  # the model it created is gone too
    v = catalog.register_folder(folder, "refused", tags={"comment": "short"})
    assert v.number == 1


def test_database_refusal_undoes_the_mlflow_version(catalog, backend, mlflow_store, tmp_path):
    catalog.register_folder(make_sae_folder(tmp_path / "a", seed=1), "undo")
    add_trigger(backend, "sae_versions")
    with pytest.raises(DBAPIError, match="refused by a test trigger"):
        catalog.register_folder(make_sae_folder(tmp_path / "b", seed=2), "undo")
    assert [mv.version for mv in mlflow_store.search_model_versions("name = 'undo'")] == [1]
    with pytest.raises(DBAPIError):
        catalog.register_folder(make_sae_folder(tmp_path / "c", seed=3), "first-of-its-name")
    assert [m.name for m in mlflow_store.search_registered_models()] == ["undo"]
    drop_trigger(backend, "sae_versions")

    v2 = catalog.register_folder(make_sae_folder(tmp_path / "b", seed=2), "undo")
    assert v2.number == 2  # the failed attempts used no number
    mv = mlflow_store.get_model_version("undo", v2.mlflow_model_version)
    assert mv.tags["saereg.uid"] == v2.uid and mv.tags["saereg.version"] == "2"


def test_alias_and_deprecation_stay_in_step(catalog, backend, mlflow_store, tmp_path):
    for seed in range(2):
        catalog.register_folder(make_sae_folder(tmp_path / str(seed), seed=seed), "steps")
    catalog.set_alias("steps", "prod", 1)

    add_trigger(backend, "alias_events")  # catalog refuses after MLflow moved the alias
    with pytest.raises(DBAPIError):
        catalog.set_alias("steps", "prod", 2)
    with pytest.raises(DBAPIError):
        catalog.set_alias("steps", "staging", 2)
    with pytest.raises(DBAPIError):
        catalog.unset_alias("steps", "prod")
    assert mlflow_store.get_registered_model("steps").aliases == {"prod": 1}
    assert catalog.get("steps@prod").number == 1 and catalog.get("steps@2").aliases == []
    drop_trigger(backend, "alias_events")

    add_trigger(backend, "sae_versions", when="UPDATE")
    with pytest.raises(DBAPIError):
        catalog.deprecate("steps@2", "testing")
    assert "saereg.status" not in mlflow_store.get_model_version("steps", "2").tags
    assert catalog.get("steps@2").status == "ready"
    drop_trigger(backend, "sae_versions")

    mlflow_store.delete_registered_model("steps")  # MLflow side gone: the catalog refuses too
    with pytest.raises(MirrorError, match="setting alias 'prod'"):
        catalog.set_alias("steps", "prod", 2)
    with pytest.raises(MirrorError):
        catalog.deprecate("steps@2", "testing")
    assert catalog.get("steps@prod").number == 1 and catalog.get("steps@2").status == "ready"


CHILD = textwrap.dedent("""
    import sys
    from saereg.registry.api import register_from_folder
    register_from_folder(sys.argv[1], "stalled")
    print("committed")
""")


def test_crash_between_mlflow_and_commit_is_collected(catalog, backend, mlflow_store, tmp_path):
    if backend == "sqlite":  # SQLite triggers cannot sleep: make one that computes for minutes
        catalog.register_folder(make_sae_folder(tmp_path / "big", d_sae=2048), "big")
        body = "SELECT count(*) FROM features a, features b, features c"
    else:
        body = "PERFORM pg_sleep(120)"
    add_trigger(backend, "sae_versions", body=body)
    folder = make_sae_folder(tmp_path / "s")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder)], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if mlflow_store.search_model_versions("name = 'stalled'"):
                break
            time.sleep(0.1)
        time.sleep(0.3)
        assert proc.poll() is None, proc.communicate()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    if backend == "postgresql":  # the server only notices the dead client when it next talks
        with db.get_engine().begin() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                              "datname = current_database() AND wait_event = 'PgSleep'"))
    db.dispose_all()
    drop_trigger(backend, "sae_versions")
    assert [r.name for r in catalog.list()] == (["big"] if backend == "sqlite" else [])
    assert len(mlflow_store.search_model_versions("name = 'stalled'")) == 1

    assert gc(dry_run=True).mlflow_versions == []  # young: could be a registration in flight
    report = gc(min_age=0)
    assert report.mlflow_versions == [("stalled", "1")]
    assert mlflow_store.search_model_versions("name = 'stalled'") == []
    assert catalog.register_folder(tmp_path / "s", "stalled").number == 1
