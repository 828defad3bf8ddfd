"""Crashes and corruption, with real processes and real files. A registering process killed
after it stored its files but before its transaction committed leaves no visible version and
no row; running it again succeeds; `gc` leaves young files alone (a registration may be in
flight) and removes exactly the orphaned blobs and tree, while what versions reference stays
loadable. One flipped byte in a stored file makes load and export refuse with an error naming
the file and both hashes, and registering the same content again repairs the blob."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from catalog_helpers import make_sae_folder, sha256_of, table_counts
from click.testing import CliRunner

from saereg.commands.main import cli
from saereg.registry.api import export_sae, gc, load_sae
from saereg.registry.catalog.store import ArtifactStore, StoredFile, tree_id
from saereg.registry.errors import ChecksumError

CHILD = textwrap.dedent("""
    import sys
    from saereg.registry.api import register_from_folder
    register_from_folder(sys.argv[1], sys.argv[2])
    print("committed")
""")


@contextlib.contextmanager
def catalog_write_lock(backend: str):
    """Hold the catalog's write lock from another connection (as a long transaction would)."""
    from saereg.registry.catalog import db

    url = db.database_url()
    db.get_engine(url)  # the catalog exists and is migrated
    if backend == "sqlite":
        conn = sqlite3.connect(db.get_engine(url).url.database, isolation_level=None, timeout=30)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.rollback()
            conn.close()
    else:
        from sqlalchemy import create_engine, text

        engine = create_engine(url)
        with engine.connect() as conn:
            conn.execute(text("LOCK TABLE language_models IN EXCLUSIVE MODE"))
            try:
                yield
            finally:
                conn.rollback()
        engine.dispose()


def blobs(store: ArtifactStore) -> set[str]:
    return {sha for sha, _ in store.iter_blobs()}


def folder_files(folder) -> list[StoredFile]:
    return [StoredFile(n, sha256_of(folder / n), (folder / n).stat().st_size)
            for n in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")]


def kill_while_blocked(folder, name: str, store: ArtifactStore, backend: str) -> None:
    """Start a registration, let it store its files, kill it before it can commit."""
    files = folder_files(folder)
    stored = [store.blob_path(f.sha256) for f in files] + [store.tree_path(tree_id(files))]
    with catalog_write_lock(backend):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), name],
                                env=dict(os.environ), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if all(os.path.exists(p) for p in stored):
                break
            time.sleep(0.05)
        time.sleep(0.5)  # now waiting for the lock, inside its commit path
        assert proc.poll() is None, proc.communicate()
        assert all(os.path.exists(p) for p in stored)
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    assert "committed" not in out


def test_killed_registration_leaves_nothing_visible(catalog, backend, mlflow_store, tmp_path):
    store = catalog.store
    a = make_sae_folder(tmp_path / "a", seed=1)
    b = make_sae_folder(tmp_path / "b", seed=2)  # same cfg.json as a, other tensors
    hashes_a = {f.sha256 for f in folder_files(a)}
    only_b = {f.sha256 for f in folder_files(b)} - hashes_a
    assert len(only_b) == 2

    kill_while_blocked(a, "crashy", store, backend)
    assert blobs(store) == hashes_a
    assert catalog.list() == [] and set(table_counts().values()) == {0}
    assert mlflow_store.search_registered_models() == []

    v = catalog.register_folder(a, "crashy")  # the re-run
    assert v.number == 1 and {f.sha256 for f in v.files} == hashes_a

    kill_while_blocked(b, "crashy", store, backend)
    assert blobs(store) == hashes_a | only_b
    assert [r.ref for r in catalog.list()] == ["crashy@1"]
    assert table_counts()["sae_versions"] == 1

    young = gc()  # default minimum age: what a registration in flight wrote is left alone
    assert young.blobs == [] and blobs(store) == hashes_a | only_b
    dry = gc(dry_run=True, min_age=0)
    assert set(dry.blobs) == only_b and len(dry.trees) == 1
    assert blobs(store) == hashes_a | only_b  # a dry run removes nothing
    report = gc(min_age=0)
    assert set(report.blobs) == only_b
    assert blobs(store) == hashes_a
    assert [t for t, _ in store.iter_trees()] == [v.store_tree]
    load_sae("crashy@1")  # everything it needs is still there, verified


def flip_one_byte(path) -> None:
    os.chmod(path, 0o644)
    data = bytearray(open(path, "rb").read())
    i = len(data) - 7
    data[i] ^= 0x01
    with open(path, "r+b") as f:
        f.write(bytes(data))


def test_flipped_byte_is_refused_naming_file_and_hashes(catalog, mlflow_store, tmp_path):
    folder = make_sae_folder(tmp_path / "s", seed=4)
    v = catalog.register_folder(folder, "fragile")
    weights = next(f for f in v.files if f.name == "sae_weights.safetensors")
    blob = catalog.store.blob_path(weights.sha256)
    flip_one_byte(blob)
    actual = sha256_of(blob)

    with pytest.raises(ChecksumError) as e:
        load_sae("fragile@1")
    msg = str(e.value)
    assert "sae_weights.safetensors" in msg and weights.sha256 in msg and actual in msg
    assert e.value.expected == weights.sha256 and e.value.actual == actual

    with pytest.raises(ChecksumError):
        export_sae("fragile@1", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

    result = CliRunner().invoke(cli, ["sae", "export", "fragile@1", str(tmp_path / "out")])
    assert result.exit_code == 1 and weights.sha256 in result.output and actual in result.output

    catalog.register_folder(folder, "fragile")  # same content again: the blob is rewritten
    assert sha256_of(blob) == weights.sha256
    load_sae("fragile@1")
