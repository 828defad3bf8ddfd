"""Eight real processes register versions of one SAE at the same moment (SQLite: starting from
no catalog at all, so they also race to create it; PostgreSQL: a migrated catalog): they get
eight distinct, gapless numbers, every one exits 0, no "database is locked" reaches anyone, and
MLflow holds exactly the same eight versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

from catalog_helpers import make_sae_folder

N = 8

CHILD = textwrap.dedent("""
    import json, os, sys, time
    import mlflow.store.model_registry.sqlalchemy_store  # imports happen before the start line
    import mlflow.store.tracking.sqlalchemy_store
    from saereg.registry.api import register_from_folder
    go, folder = sys.argv[1], sys.argv[2]
    open(go + "-ready-" + sys.argv[3], "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)
    v = register_from_folder(folder, "shared", tags={"worker": sys.argv[3]})
    print(json.dumps({"number": v.number, "uid": v.uid, "mlflow": v.mlflow_model_version}))
""")


def test_eight_processes_get_distinct_gapless_numbers(backend, mlflow_store, tmp_path):
    from saereg.registry.catalog.writes import Catalog
    from saereg.registry.paths import saereg_home

    if backend == "sqlite":
        assert not (saereg_home() / "catalog.db").exists()
    folders = [make_sae_folder(tmp_path / f"w{i}", seed=i) for i in range(N)]
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(go), str(folders[i]), str(i)],
                              env=dict(os.environ), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(N)]
    deadline = time.time() + 120
    while time.time() < deadline and len(list(tmp_path.glob("go-ready-*"))) < N:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.touch()  # every process is past its imports: they all register at once
    started = time.time()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        assert "locked" not in err.lower() and "deadlock" not in err.lower(), err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{N} registrations took {time.time() - started:.1f} s after the start line")
    assert sorted(r["number"] for r in results) == list(range(1, N + 1))
    assert len({r["uid"] for r in results}) == N

    cat = Catalog()
    versions = [cat.get(f"shared@{n}") for n in range(1, N + 1)]
    assert sorted(v.tags["worker"] for v in versions) == [str(i) for i in range(N)]
    mlflow_versions = mlflow_store.search_model_versions("name = 'shared'")
    assert len(mlflow_versions) == N
    by_uid = {mv.tags["saereg.uid"]: mv for mv in mlflow_versions}
    for v in versions:
        assert by_uid[v.uid].tags["saereg.version"] == str(v.number)
        assert by_uid[v.uid].version == int(v.mlflow_model_version)


OPENER = textwrap.dedent("""
    import os, sys, time
    from saereg.registry.catalog.db import _create_engine
    go, db = sys.argv[1], sys.argv[2]
    engine = _create_engine("sqlite:///" + db)
    while not os.path.exists(go):
        time.sleep(0.001)
    with engine.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS t (x)")
        print(conn.exec_driver_sql("PRAGMA journal_mode").scalar())
""")


def test_many_processes_opening_a_new_sqlite_catalog_all_get_wal(tmp_path):
    """Switching a new file to WAL needs an exclusive lock that SQLite refuses at once (no busy
    wait) while others hold the file: twelve processes opening one new catalog together must
    all connect, and the file ends in WAL mode."""
    for trial in range(3):
        db, go = tmp_path / f"c{trial}.db", tmp_path / f"go{trial}"
        procs = [subprocess.Popen([sys.executable, "-c", OPENER, str(go), str(db)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(12)]
        time.sleep(2.5)  # past their imports
        go.touch()
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-2000:]
            assert out.strip() == "wal"
