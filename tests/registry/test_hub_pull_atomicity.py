"""A pulled version and its pull record land in the catalog together, with real processes.

A real `saereg sync pull` killed (SIGKILL) while the database is writing its pull record leaves
no version without that record (nor any version), and the next pull completes it: the version,
its pull record and nothing twice. Two pulls at once of labels added upstream to a version the
catalog has add each label once (PostgreSQL). A catalog that already holds a pulled version without its
pull record (as an interrupted pull of an older release left it) gets the record on the next
pull, and no second version. hub/sync.py and hub/features_push.py write no rows themselves: they
import no ORM or SQL write machinery and call no private Catalog method."""

from __future__ import annotations

import ast
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from catalog_helpers import BACKENDS, make_sae_folder, table_counts
from sqlalchemy import select, text
from test_hub import hub  # noqa: F401 - the hub server fixture

from saereg.registry.catalog import db
from saereg.registry.catalog.schema import Publication, SAEVersion

REPO = "someone/gpt2-saes"
FOLDER = "blocks.6.hook_resid_post"


def upload(hub, tmp_path: Path, d_sae: int) -> str:  # noqa: F811
    """A plain SAELens repo with one SAE folder; returns the commit."""
    from huggingface_hub import HfApi

    stage = tmp_path / "stage"
    make_sae_folder(stage / FOLDER, model="gpt2", hook="blocks.6", d_sae=d_sae, seed=3)
    api = HfApi(endpoint=hub.url)
    api.create_repo(REPO)
    return api.upload_folder(repo_id=REPO, folder_path=str(stage)).oid


def saereg(*args: str, **kw) -> subprocess.Popen:
    exe = shutil.which("saereg", path=os.path.dirname(sys.executable))
    assert exe, "the saereg console script is not installed next to this interpreter"
    return subprocess.Popen([exe, *args], env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def pull_records() -> dict[int, list[tuple]]:
    """Every catalog version, with its pull records (repo, path, revision, commit)."""
    with db.session() as s:
        out = {vid: [] for vid in s.scalars(select(SAEVersion.id))}
        for row in s.scalars(select(Publication).where(Publication.direction == "pull")):
            out.setdefault(row.version_id, []).append((row.repo, row.path, row.revision,
                                                       row.commit))
        return out


def stall_publications(backend: str) -> None:
    """A trigger that keeps every INSERT into publications busy for minutes."""
    with db.get_engine().begin() as conn:
        if backend == "sqlite":  # SQLite triggers cannot sleep: they compute instead
            conn.execute(text("CREATE TRIGGER stall_publications BEFORE INSERT ON publications "
                              "BEGIN SELECT count(*) FROM features a, features b, features c; "
                              "END"))
        else:
            conn.execute(text("CREATE OR REPLACE FUNCTION stall_publications() RETURNS trigger "
                              "AS $$ BEGIN PERFORM pg_sleep(120); RETURN NEW; END $$ "
                              "LANGUAGE plpgsql"))
            conn.execute(text("CREATE TRIGGER stall_publications BEFORE INSERT ON publications "
                              "FOR EACH ROW EXECUTE FUNCTION stall_publications()"))


def drop_stall(backend: str) -> None:
    with db.get_engine().begin() as conn:
        if backend == "sqlite":
            conn.execute(text("DROP TRIGGER stall_publications"))
        else:
            conn.execute(text("DROP TRIGGER stall_publications ON publications"))
            conn.execute(text("DROP FUNCTION stall_publications()"))


def pg_sleeping() -> bool:
    with db.get_engine().connect() as conn:
        return bool(conn.scalar(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND "
            "wait_event = 'PgSleep'")))


def test_killed_pull_leaves_no_version_without_its_pull_record(hub, catalog, backend,  # noqa: F811
                                                               mlflow_store, tmp_path):
    commit = upload(hub, tmp_path, d_sae=2048)  # 2048 features: SQLite's trigger runs for minutes
    catalog.list()  # the catalog exists (and, on SQLite, is migrated) before the trigger
    stall_publications(backend)
    proc = saereg("sync", "pull", REPO)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            # the MLflow version is made inside the catalog transaction, after the version's
            # rows are the only thing left; on PostgreSQL the trigger's sleep is visible
            if mlflow_store.search_model_versions(f"name = '{FOLDER}'") and (
                    backend == "sqlite" or pg_sleeping()):
                break
            time.sleep(0.1)
        time.sleep(0.5)  # SQLite: past the version's rows, computing in the trigger
        assert proc.poll() is None, proc.communicate()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    assert "registered as" not in out
    if backend == "postgresql":  # the server only notices the dead client when it next talks
        with db.get_engine().begin() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                              "datname = current_database() AND wait_event = 'PgSleep'"))
    db.dispose_all()
    drop_stall(backend)
    assert len(mlflow_store.search_model_versions(f"name = '{FOLDER}'")) == 1  # it got that far
    assert [vid for vid, recs in pull_records().items() if not recs] == []
    assert catalog.list() == []

    again = saereg("sync", "pull", REPO)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"registered as {FOLDER}@1" in out
    [(vid, recs)] = pull_records().items()
    assert recs == [(REPO, FOLDER, commit, commit)]
    v = catalog.get(f"{FOLDER}@1")
    assert v.id == vid and v.source_uri == f"hf://{REPO}/{FOLDER}@{commit}"
    assert len(v.files) == 3

    counts = table_counts()
    third = saereg("sync", "pull", REPO)
    out, err = third.communicate(timeout=300)
    assert third.returncode == 0, err
    assert f"already in the catalog as {FOLDER}@1" in out and table_counts() == counts


def test_repull_records_a_missing_pull_record(hub, catalog, backend, mlflow_store,  # noqa: F811
                                              tmp_path):
    from saereg.registry.hub.sync import pull

    commit = upload(hub, tmp_path, d_sae=64)
    [first] = pull(f"{REPO}@main")
    assert first.added
    with db.session(write=True) as s:  # as an interrupted pull of an older release left it
        s.execute(Publication.__table__.delete())
    assert list(pull_records().values()) == [[]]
    counts = table_counts()

    [again] = pull(f"{REPO}@main")
    assert not again.added and again.ref == first.ref
    assert list(pull_records().values()) == [[(REPO, FOLDER, "main", commit)]]
    assert table_counts() == {**counts, "publications": 1}
    [third] = pull(REPO)
    assert not third.added and table_counts() == {**counts, "publications": 1}


def _features(d_sae: int, texts: list[tuple[int, str]]) -> bytes:
    """features.parquet with one label per ``(feature, text)``, written by the exporter."""
    import tempfile

    from saereg.registry.hub import features as hub_features

    labels: list[list[dict]] = [[] for _ in range(d_sae)]
    for j, (i, t) in enumerate(texts):
        labels[i].append({"text": t, "method": "human", "model": None, "status": "candidate",
                          "detection_score": None, "created_by": "ann", "supersedes": None,
                          "created_at": f"2026-01-01T00:00:{j:02d}+00:00"})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.parquet"
        hub_features.write(path, hub_features.FeatureExport(d_sae, [None] * d_sae,
                                                            labels=labels))
        return path.read_bytes()


@pytest.mark.parametrize("backend", BACKENDS[1:], indirect=True)  # PostgreSQL only
def test_two_pulls_at_once_add_new_labels_once(hub, catalog, backend, mlflow_store,  # noqa: F811
                                               tmp_path):
    """PostgreSQL: two `saereg sync pull` processes bring the labels added upstream to a version
    the catalog has. The first holds its transaction open (a trigger sleeps in its label
    INSERT) while the second starts; the second waits for it, then finds the labels there and
    adds none. (SQLite runs one writer at a time by itself.)"""
    from saereg.registry.catalog.feature_schema import FeatureLabel
    from saereg.registry.hub.sync import pull

    upload(hub, tmp_path, d_sae=64)
    old = [(1, "travel"), (2, "rivers")]
    hub.state.put_files(REPO, {f"{FOLDER}/features.parquet": _features(64, old)})
    [first] = pull(REPO)
    assert first.added and first.labels == 2
    hub.state.put_files(REPO, {f"{FOLDER}/features.parquet": _features(
        64, old + [(3, "music"), (1, "journeys")])})
    with db.get_engine().begin() as conn:
        conn.execute(text("CREATE OR REPLACE FUNCTION stall_labels() RETURNS trigger AS $$ "
                          "BEGIN PERFORM pg_sleep(8); RETURN NULL; END $$ LANGUAGE plpgsql"))
        conn.execute(text("CREATE TRIGGER stall_labels BEFORE INSERT ON feature_labels FOR EACH "
                          "STATEMENT EXECUTE FUNCTION stall_labels()"))
    try:
        one = saereg("sync", "pull", REPO)
        deadline = time.time() + 120
        while time.time() < deadline and not pg_sleeping() and one.poll() is None:
            time.sleep(0.1)
        assert pg_sleeping(), one.communicate()
        two = saereg("sync", "pull", REPO)  # starts while the first sleeps in its INSERT
        outs = [p.communicate(timeout=300) for p in (one, two)]
    finally:
        with db.get_engine().begin() as conn:
            conn.execute(text("DROP TRIGGER IF EXISTS stall_labels ON feature_labels"))
            conn.execute(text("DROP FUNCTION IF EXISTS stall_labels()"))
    assert [p.returncode for p in (one, two)] == [0, 0], outs
    said = sorted(out for out, _ in outs)
    assert "(2 new labels)" in said[0] + said[1] and sum("new labels" in o for o in said) == 1
    with db.session() as s:
        rows = sorted(s.execute(select(FeatureLabel.feature_index, FeatureLabel.text)).tuples())
    assert rows == [(1, "journeys"), (1, "travel"), (2, "rivers"), (3, "music")]


@pytest.mark.parametrize("module", ["sync", "features_push"])
def test_sync_writes_no_rows_itself(module):
    import importlib

    sync = importlib.import_module(f"saereg.registry.hub.{module}")
    tree = ast.parse(Path(sync.__file__).read_text(encoding="utf-8"))
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                imported[f"{node.module}.{alias.name}"] = node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                imported[alias.name] = alias.name
    assert not [m for m in imported.values() if m.split(".")[0] == "sqlalchemy"]
    assert not [m for m in imported.values() if m in ("saereg.registry.catalog.schema",
                                                      "saereg.registry.catalog.db",
                                                      "saereg.registry.catalog.rows")]
    assert "saereg.registry.catalog.schema.Publication" not in imported
    private = sorted({node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                      and isinstance(node.value, ast.Name) and node.value.id == "cat"
                      and node.attr.startswith("_")})
    assert private == []
    writes = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Attribute) and node.func.attr == "session"
              and any(k.arg == "write" for k in node.keywords)]
    assert writes == []
