"""Faults and abuse around the catalog database, its schema commands and `sae export`: each is
refused with one line of error naming the thing to fix (exit 1, or 2 for usage), and leaves the
rows (and files) as they were. On SQLite and PostgreSQL where the case touches a catalog.

Cases:
- `db downgrade base` without --yes and without a terminal: refused, naming --yes and every
  table it would drop with its rows; nothing dropped
- `db downgrade -1` (read as a revision, not an option) lists the tables with rows (labels,
  presets) and refuses; a step that drops columns lists them with the rows that hold a value
- `db downgrade -1 --yes` drops exactly what it listed, and nothing else
- at a terminal the downgrade asks: "n" keeps everything, "y" downgrades
- `db upgrade nonsense` / `db downgrade nonsense` / `db downgrade +1`: exit 2, the known
  revisions listed
- SAEREG_DATABASE_URL that is not a URL: exit 2, naming the variable and an example
- an unreachable PostgreSQL server: exit 1 for every command, host and port named, the
  password redacted, nothing written
- a SQLite catalog whose folder does not exist (not created), is a file, or is not writable;
  a SAEREG_HOME under a file
- `sae export REF FILE/sub` and `sae convert REF FILE/sub` (a destination under a file): exit 1,
  nothing written
- `sae export REF EXISTING` without --force: exit 2; with --force (export or convert) onto a
  folder that is not an SAE folder: refused, its files kept
- `gc --min-age 1.2.3`: a usage error, not a traceback
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from catalog_helpers import BACKENDS, error_line, make_sae_folder, table_counts
from click.testing import CliRunner

from saereg.commands.main import cli
from saereg.registry.catalog import db, migrate

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
PASSWORD = "s3cret-pw-42"
UNREACHABLE = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:1/x"
FEATURE_TABLES = ["feature_labels", "feature_neighbors", "feature_stats", "stats_runs",
                  "steering_presets", "steering_runs", "version_evals"]
LATER_TABLES = ["label_embeddings"]  # made by the revisions after 0004_feature_catalog
REVISIONS = [r.revision for r in migrate.history()]
TO_0003 = f"-{len(REVISIONS) - REVISIONS.index('0003_publications') - 1}"
"""The steps down from head to 0003_publications (below the feature catalog)."""


def seed(url: str) -> None:
    """One SAE version with a key metric, 4 features, 2 labels and 1 steering preset."""
    from sqlalchemy import insert

    t = migrate.target_metadata().tables
    who = {"created_at": NOW, "created_by": "alice"}
    with db.get_engine(url).begin() as conn:
        conn.execute(insert(t["language_models"]), [{"id": 1, "name": "tiny-llama",
                                                      "created_at": NOW}])
        conn.execute(insert(t["saes"]), [{"id": 1, "name": "foo", "model_id": 1,
                                          "hook": "model.layers.1", "architecture": "topk",
                                          "d_in": 16, "d_sae": 4, **who}])
        conn.execute(insert(t["sae_versions"]), [{
            "id": 1, "sae_id": 1, "number": 1, "uid": "a" * 32, "status": "ready",
            "config": {}, "params": {}, "metrics": {}, "artifact_uri": "file:///nowhere",
            "source_kind": "folder", "source_uri": "/x", "explained_variance": 0.8, **who}])
        conn.execute(insert(t["features"]), [{"version_id": 1, "feature_index": i,
                                              "log10_firing_rate": -1.0} for i in range(4)])
        conn.execute(insert(t["feature_labels"]), [
            {"version_id": 1, "feature_index": i, "text": f"label {i}", "method": "human",
             "status": "candidate", **who} for i in range(2)])
        conn.execute(insert(t["steering_presets"]), [{
            "name": "calm", "number": 1, "version_id": 1, "method": "add",
            "features": [{"index": 0, "strength": 2.0}], "generation": {}, **who}])


@pytest.fixture(params=BACKENDS)
def seeded(request, monkeypatch):
    """A catalog of this test's own at head, seeded: a SQLite file in SAEREG_HOME, or a new
    PostgreSQL database (dropped after the test; these tests downgrade it)."""
    monkeypatch.delenv("SAEREG_DATABASE_URL", raising=False)
    if request.param == "postgresql":
        monkeypatch.setenv("SAEREG_DATABASE_URL", request.getfixturevalue("pg_empty_url"))
    url = db.database_url()
    migrate.upgrade_engine(db.get_engine(url, check_schema=False))
    seed(url)
    yield url
    db.dispose_all()


def revision(url: str) -> str | None:
    return migrate.current_revision(db.get_engine(url, check_schema=False))


def tables(url: str) -> set[str]:
    from sqlalchemy import inspect

    return set(inspect(db.get_engine(url, check_schema=False)).get_table_names())




def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(root.rglob("*"))}


# -- downgrades ----------------------------------------------------------------------------------

def test_downgrade_to_base_without_yes_or_terminal_is_refused(seeded):
    before = table_counts(seeded)
    result = invoke("db", "downgrade", "base")
    assert result.exit_code == 1
    line = error_line(result)
    assert "pass --yes" in line and "-> base (empty)" in line
    for table, rows in before.items():
        assert f"table {table} ({rows} row{'s' * (rows != 1)})" in line
    assert revision(seeded) == migrate.head_revision()
    assert table_counts(seeded) == before


def test_one_step_downgrade_lists_labels_and_presets_and_is_refused(seeded):
    before = table_counts(seeded)
    result = invoke("db", "downgrade", "-1")  # a revision, not an unknown option
    assert result.exit_code == 1
    line = error_line(result)
    assert "No such option" not in result.output
    assert f"{REVISIONS[-1]} -> {REVISIONS[-2]}" in line and "--yes" in line
    result = invoke("db", "downgrade", TO_0003)
    assert result.exit_code == 1
    line = error_line(result)
    assert f"{REVISIONS[-1]} -> 0003_publications" in line
    assert "table feature_labels (2 rows)" in line and "table steering_presets (1 row)" in line
    assert "table saes" not in line and "--yes" in line
    result = invoke("db", "downgrade", "0001_catalog")  # steps that drop columns
    assert result.exit_code == 1
    line = error_line(result)
    assert "column sae_versions.explained_variance (1 row with a value)" in line
    assert "column sae_versions.l0 (0 rows with a value)" in line
    assert "table publications (0 rows)" in line
    assert revision(seeded) == migrate.head_revision()
    assert table_counts(seeded) == before
    help_text = invoke("db", "downgrade", "--help").output
    assert "-N for N steps down" in help_text and "--yes" in help_text


def test_downgrade_with_yes_drops_exactly_what_it_listed(seeded):
    before = tables(seeded)
    result = invoke("db", "downgrade", TO_0003, "--yes")
    assert result.exit_code == 0, result.output
    listed = [line.split()[1] for line in result.output.splitlines()
              if line.startswith("  table ")]
    assert sorted(listed) == sorted(FEATURE_TABLES + LATER_TABLES)
    assert "  table feature_labels (2 rows)" in result.output.splitlines()
    assert revision(seeded) == "0003_publications"
    assert {t for t in before - tables(seeded) if not t.startswith("feature_labels_fts")} == set(
        FEATURE_TABLES + LATER_TABLES)
    from sqlalchemy import text

    with db.get_engine(seeded, check_schema=False).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM features")).scalar() == 4
        assert conn.execute(text("SELECT explained_variance FROM sae_versions")).scalar() == 0.8


def run_at_a_terminal(args: list[str], answer: bytes) -> tuple[int, str]:
    """Run ``saereg ARGS`` in a real process on a pseudo-terminal, answer its question, and
    return its exit code and everything it wrote."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "saereg.commands.main", *args],
                            stdin=slave, stdout=slave, stderr=slave, env=dict(os.environ))
    os.close(slave)
    out, answered = b"", False
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the process has ended and closed the terminal
                break
            if not chunk:
                break
            out += chunk
            if not answered and b"[y/N]" in out:
                os.write(master, answer + b"\n")
                answered = True
        return proc.wait(timeout=120), out.decode(errors="replace").replace("\r\n", "\n")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


def test_downgrade_at_a_terminal_asks_and_no_keeps_everything(seeded):
    before = table_counts(seeded)
    code, out = run_at_a_terminal(["db", "downgrade", TO_0003], b"n")
    assert code == 1 and "Aborted" in out, out
    rows = sum(before[t] for t in FEATURE_TABLES + LATER_TABLES if t in before)
    assert "  table feature_labels (2 rows)" in out and f"dropping {rows} rows in all?" in out
    assert revision(seeded) == migrate.head_revision()
    assert table_counts(seeded) == before
    db.dispose_all()
    code, out = run_at_a_terminal(["db", "downgrade", TO_0003], b"y")
    assert code == 0, out
    assert revision(seeded) == "0003_publications"


# -- revisions --------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["db", "upgrade", "nonsense"], ["db", "downgrade", "nonsense"],
                                  ["db", "downgrade", "+1", "--yes"]])
def test_unknown_or_unreachable_revision_lists_the_known_ones(seeded, args):
    before = table_counts(seeded)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert repr(args[2]) in line
    assert f"known revisions: base, {', '.join(REVISIONS)} (head)" in line
    assert REVISIONS[:4] == ["0001_catalog", "0002_key_metrics", "0003_publications",
                             "0004_feature_catalog"]
    assert revision(seeded) == migrate.head_revision()
    assert table_counts(seeded) == before


# -- the database URL and the connection ----------------------------------------------------------

@pytest.mark.parametrize("args", [["db", "current"], ["sae", "list"]])
def test_database_url_that_is_not_a_url_names_the_variable(monkeypatch, args):
    monkeypatch.setenv("SAEREG_DATABASE_URL", "notaurl")
    result = invoke(*args)
    assert result.exit_code == 2
    line = error_line(result)
    assert "SAEREG_DATABASE_URL='notaurl' is not a database URL" in line
    assert "postgresql+psycopg://localhost:5432/saereg" in line


@pytest.mark.parametrize("args", [["db", "upgrade"], ["db", "downgrade", "--yes"],
                                  ["sae", "list"], ["gc", "--no-mlflow"],
                                  ["sae", "export", "foo", "{tmp}/out"]])
def test_unreachable_postgresql_server_is_one_line_without_the_password(monkeypatch, tmp_path,
                                                                        args):
    monkeypatch.setenv("SAEREG_DATABASE_URL", UNREACHABLE)
    result = invoke(*(a.format(tmp=tmp_path) for a in args))
    assert result.exit_code == 1
    line = error_line(result)
    assert "cannot connect to the catalog database at 127.0.0.1:1" in line
    assert "postgres:***@127.0.0.1:1/x" in line and "SAEREG_DATABASE_URL" in line
    assert PASSWORD not in result.output
    assert list(tmp_path.iterdir()) == []


def test_sqlite_catalog_in_a_missing_folder_is_refused_and_not_created(monkeypatch, tmp_path):
    monkeypatch.setenv("SAEREG_DATABASE_URL", f"sqlite:///{tmp_path / 'typo' / 'catalog.db'}")
    for args in (["db", "upgrade"], ["sae", "list"]):
        result = invoke(*args)
        assert result.exit_code == 1
        line = error_line(result)
        assert f"its folder {tmp_path / 'typo'} does not exist" in line
        assert "SAEREG_DATABASE_URL" in line
    assert list(tmp_path.iterdir()) == []


def test_sqlite_catalog_under_a_file_is_refused(monkeypatch, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.setenv("SAEREG_DATABASE_URL", f"sqlite:///{tmp_path / 'afile' / 'catalog.db'}")
    result = invoke("db", "upgrade")
    assert result.exit_code == 1
    assert f"its folder {tmp_path / 'afile'} is a file, not a folder" in error_line(result)
    assert files_under(tmp_path) == {"afile": b"not a folder"}


def test_sqlite_catalog_in_a_folder_that_is_not_writable_is_refused(monkeypatch, tmp_path):
    if os.geteuid() == 0:  # permissions do not stop root; procfs refuses new files to anyone
        folder = Path("/proc")
    else:
        folder = tmp_path / "readonly"
        folder.mkdir()
        folder.chmod(0o500)
    monkeypatch.setenv("SAEREG_DATABASE_URL", f"sqlite:///{folder / 'saereg-catalog.db'}")
    try:
        result = invoke("db", "upgrade")
    finally:
        if folder != Path("/proc"):
            folder.chmod(0o700)
    assert result.exit_code == 1
    line = error_line(result)
    assert f"cannot open the SQLite catalog {folder / 'saereg-catalog.db'}" in line
    assert f"{folder} is not writable" in line or f"folder {folder} is writable" in line
    assert not (folder / "saereg-catalog.db").exists()


def test_saereg_home_under_a_file_is_refused(monkeypatch, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.delenv("SAEREG_DATABASE_URL", raising=False)
    monkeypatch.setenv("SAEREG_HOME", str(tmp_path / "afile" / "home"))
    result = invoke("db", "upgrade")
    assert result.exit_code == 1
    assert f"cannot create SAEREG_HOME {tmp_path / 'afile' / 'home'}" in error_line(result)
    assert files_under(tmp_path) == {"afile": b"not a folder"}


def test_gc_min_age_that_is_not_a_number_is_a_usage_error():
    result = invoke("gc", "--dry-run", "--no-mlflow", "--min-age", "1.2.3")
    assert result.exit_code == 2
    assert "'1.2.3' is not a duration" in error_line(result)


# -- export destinations --------------------------------------------------------------------------

@pytest.fixture
def exported_version(catalog, tmp_path):
    catalog.register_folder(make_sae_folder(tmp_path / "src"), "foo")
    dest = tmp_path / "dest"
    dest.mkdir()
    return dest


@pytest.mark.parametrize("command", [["export"], ["convert", "--to", "sparsify"]])
def test_export_under_a_file_writes_nothing(exported_version, command):
    dest = exported_version
    (dest / "afile").write_text("keep me")
    before, counts = files_under(dest), table_counts()
    result = invoke("sae", *command[:1], "foo@1", str(dest / "afile" / "sub"), *command[1:])
    assert result.exit_code == 1
    line = error_line(result)
    assert f"cannot export to {dest / 'afile' / 'sub'}: {dest / 'afile'} is a file" in line
    assert files_under(dest) == before and table_counts() == counts


def test_export_to_an_existing_folder_needs_force(exported_version):
    dest = exported_version
    assert invoke("sae", "export", "foo@1", str(dest / "sae")).exit_code == 0
    before, counts = files_under(dest), table_counts()
    result = invoke("sae", "export", "foo@1", str(dest / "sae"))
    assert result.exit_code == 2
    assert f"{dest / 'sae'} already exists (pass --force" in error_line(result)
    assert invoke("sae", "export", "foo@1", str(dest / "sae"), "--force").exit_code == 0
    assert files_under(dest) == before and table_counts() == counts  # replaced by the same


@pytest.mark.parametrize("command", ["export", "convert"])
def test_export_force_onto_a_folder_that_is_not_an_sae_folder_keeps_its_files(exported_version,
                                                                              command):
    dest = exported_version
    (dest / "work").mkdir()
    (dest / "work" / "notes.txt").write_text("mine")
    before = files_under(dest)
    result = invoke("sae", command, "foo@1", str(dest / "work"), "--force")
    assert result.exit_code == 2
    assert f"refusing to replace {dest / 'work'}: it is not an SAE folder" in error_line(result)
    assert files_under(dest) == before
