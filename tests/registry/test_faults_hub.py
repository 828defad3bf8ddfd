"""Hub sync against tampered and hostile repos (served by tests/hubserver.py to the real
huggingface_hub client), on SQLite and on PostgreSQL. Each case exits 1 (2 for usage) with one
line of error naming the thing to fix, and leaves the catalog's row counts, the artifact store,
the MLflow model versions and huggingface_hub's folder as they were; a pull's own download
folder is gone afterwards, and nothing outside it is read or written.

Cases:
- a registry.json that omits the weights (tampered weights would otherwise register unchecked;
  an ``hf://`` load refuses it too);
- a registry.json entry that leaves the download folder (``/etc/hostname``,
  ``../../../../etc/hostname``, an absolute or ``..`` path to a planted file whose sha256 it
  gives, a backslash, a NUL): refused, naming the entry, and the file is never opened;
- a download that is not the file the Hub lists at the pinned commit (same size, other bytes),
  on pull and on an ``hf://`` load;
- repo file names that leave the folder (``..``, a leading ``/``, a NUL): refused, naming the
  file, before any download;
- a registry.json of the wrong JSON shape (``files`` a list, an entry that is not an object, a
  sha256 that is a number, metrics a list, a metric that is a string, lineage of the wrong type,
  not an object at all, not JSON);
- a registry.json metric that is Infinity, -Infinity or NaN: refused, naming the metric; a
  cfg.json value that is NaN, and one with a NUL (what PostgreSQL would refuse mid-write);
- pushing a version whose stored files no longer match their sha256: refused before any request
  reaches the Hub (no repo is created);
- ``sync push --path /abs`` (and ``/``, ``..``) and ``sync pull --path /abs``: a usage error;
- two `saereg sync pull` processes of the same folder at the same moment (both past the
  "already a version?" check before either writes): one version, one MLflow model version, one
  pull record; one process says it registered it, the other that it is already there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from catalog_helpers import error_line, make_sae_folder, table_counts
from click.testing import CliRunner
from sqlalchemy import select, text
from test_hub import hub  # noqa: F401 - the hub server fixture

from saereg.commands.main import cli
from saereg.registry.api import load_sae
from saereg.registry.catalog import db
from saereg.registry.catalog.schema import Publication
from saereg.registry.errors import HubError, SAEFormatError
from saereg.registry.paths import saereg_home

REPO = "someone/l6-saes"
FOLDER = "blocks.6"

# -- opens of watched paths, seen through an audit hook (installed once, idle when unwatched) --
WATCHED: set[str] = set()
OPENED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if WATCHED and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path in WATCHED:
            OPENED.append(path)


sys.addaudithook(_audit)


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """This test's temporary folder (where a pull makes its download folder)."""
    path = tmp_path / "tmp"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


@pytest.fixture
def empty_catalog(catalog, mlflow_store, scratch):
    """The catalog of this test's backend, created, with nothing in it."""
    catalog.list()
    return catalog


# -- helpers -------------------------------------------------------------------------------------

def sh(*args: str):
    return CliRunner().invoke(cli, list(args))




def files_in(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256; links by their target)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (f"-> {os.readlink(p)}" if p.is_symlink() else
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


def world(mlflow_store, tmp_path: Path) -> dict:
    """What a refused call must leave as it was: catalog rows, the artifact store, MLflow model
    versions, and every file under the test's folder (huggingface_hub's HF_HOME, the temporary
    folder a pull downloads into, planted files)."""
    return {"rows": table_counts(), "store": files_in(saereg_home() / "artifacts"),
            "mlflow": sorted((v.name, v.version) for v in mlflow_store.search_model_versions()),
            "files": files_in(tmp_path)}


def sae_files(tmp_path: Path, seed: int = 3) -> dict[str, bytes]:
    folder = make_sae_folder(tmp_path / f"sae-{seed}", model="gpt2", hook="blocks.6",
                             d_sae=64, seed=seed)
    out = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    shutil.rmtree(folder)
    return out


def registry_json(sae: dict[str, bytes], **changes) -> dict:
    """registry.json as a push writes it for the files ``sae``, with ``changes`` on top."""
    record = {"format": "saereg.registry/1", "name": "l6", "version": 1,
              "files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                        for n, b in sae.items()},
              "metrics": {"l0": 4.0, "explained_variance": 0.8},
              "lineage": {"dataset": "pile", "training_tokens": 4096, "context_size": 64}}
    record.update(changes)
    return record


def serve(hub, files: dict[str, bytes], record: dict | str | None) -> str:  # noqa: F811
    """The repo REPO with ``files`` (and registry.json: an object, raw text, or none) under
    FOLDER; returns the commit."""
    tree = {f"{FOLDER}/{n}": b for n, b in files.items()}
    if record is not None:
        raw = record if isinstance(record, str) else json.dumps(record)
        tree[f"{FOLDER}/registry.json"] = raw.encode()
    return hub.state.put_files(REPO, tree)


def refused_pull(mlflow_store, tmp_path, *args: str, code: int = 1,
                 unread: tuple[Path, ...] = ()) -> str:
    """`saereg sync pull REPO ARGS` refused: its error line, with everything left as it was
    and none of the files ``unread`` opened by the pull."""
    before = world(mlflow_store, tmp_path)
    WATCHED.update(os.path.abspath(p) for p in unread)
    try:
        result = sh("sync", "pull", REPO, *args)
    finally:
        WATCHED.clear()
    assert OPENED == []
    line = error_line(result, code)
    assert world(mlflow_store, tmp_path) == before
    assert not files_in(tmp_path / "hf-home")  # huggingface_hub's cache is never used by pull
    return line


# -- registry.json ---------------------------------------------------------------------------

def test_registry_json_that_omits_the_weights_is_refused(hub, empty_catalog, mlflow_store,  # noqa: F811
                                                         tmp_path):
    honest = sae_files(tmp_path)
    record = registry_json(honest)
    del record["files"]["sae_weights.safetensors"]
    tampered = {**honest, "sae_weights.safetensors": sae_files(tmp_path, seed=9)[
        "sae_weights.safetensors"]}
    serve(hub, tampered, record)
    line = refused_pull(mlflow_store, tmp_path)
    assert "registry.json does not list sae_weights.safetensors" in line
    assert f"hf://{REPO}/{FOLDER}@" in line
    with pytest.raises(SAEFormatError, match="does not list sae_weights.safetensors"):
        load_sae(f"hf://{REPO}/{FOLDER}")  # an hf:// load holds to the same rule


@pytest.mark.parametrize("entry", [
    "/etc/hostname", "../../../../etc/hostname", "PLANTED_ABSOLUTE", "PLANTED_DOTDOT",
    "sub\\..\\..\\x", "x\x00y"])
def test_registry_json_entry_outside_the_download_folder_is_refused(
        hub, empty_catalog, mlflow_store, tmp_path, entry):  # noqa: F811
    planted = tmp_path / "outside" / "secret.txt"
    planted.parent.mkdir()
    planted.write_bytes(b"not for the pull to read\n")
    name = {"PLANTED_ABSOLUTE": str(planted),
            "PLANTED_DOTDOT": "../" * 40 + str(planted).lstrip("/")}.get(entry, entry)
    target = planted if entry.startswith("PLANTED") else Path("/etc/hostname")
    files = sae_files(tmp_path)
    record = registry_json(files)
    if target.is_file():  # the right sha256: a pull that read it would have found it matching
        record["files"][name] = {"sha256": hashlib.sha256(target.read_bytes()).hexdigest()}
    else:
        record["files"][name] = {"sha256": "0" * 64}
    serve(hub, files, record)
    line = refused_pull(mlflow_store, tmp_path, unread=(planted, Path("/etc/hostname")))
    assert f"registry.json entry {name!r}" in line and "refusing it" in line


@pytest.mark.parametrize(("change", "message"), [
    ({"files": [["cfg.json", "0" * 64]]},
     "'files' must be an object (file name -> sha256 and size), not a list"),
    ({"files": {"cfg.json": "abc"}}, "entry 'cfg.json' must be an object, not a string"),
    ({"files": {"cfg.json": {"sha256": 7}}}, "entry 'cfg.json' needs a sha256 of 64 hex digits"),
    ({"metrics": [4.0]}, "'metrics' must be an object, not a list"),
    ({"metrics": {"l0": "four"}}, "metric 'l0' must be a number, not a string"),
    ({"lineage": {"training_tokens": "many"}},
     "'training_tokens' must be an integer, not a string"),
    ({"lineage": "pile"}, "'lineage' must be an object, not a string"),
    ({"lineage": {"context_size": 2 ** 40}},
     "lineage 'context_size' must be an integer in 0..2147483647, not 1099511627776"),
    ({"lineage": {"dataset": "pi\x00le"}}, "lineage.dataset holds a NUL character"),
    ({"version": "one"}, "'version' must be an integer, not a string"),
    ("[1, 2]", "registry.json must hold a JSON object, not a list"),
    ("{not json", "registry.json is unreadable"),
])
def test_registry_json_of_the_wrong_shape_is_refused(hub, empty_catalog, mlflow_store,  # noqa: F811
                                                     tmp_path, change, message):
    files = sae_files(tmp_path)
    serve(hub, files, change if isinstance(change, str) else registry_json(files, **change))
    assert message in refused_pull(mlflow_store, tmp_path)


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_registry_json_with_a_non_finite_metric_is_refused(hub, empty_catalog, mlflow_store,  # noqa: F811
                                                           tmp_path, value):
    files = sae_files(tmp_path)
    raw = json.dumps(registry_json(files, metrics={"l0": 4.0, "explained_variance": 0.5}))
    serve(hub, files, raw.replace('"explained_variance": 0.5', f'"explained_variance": {value}'))
    line = refused_pull(mlflow_store, tmp_path)
    assert "metric 'explained_variance' is not a finite number" in line


@pytest.mark.parametrize(("value", "message"), [
    ("NaN", "cfg.json: metadata.lr is not a finite number (nan)"),
    ('"a\\u0000b"', "cfg.json: metadata.lr holds a NUL character")])
def test_cfg_json_that_no_catalog_can_store_is_refused(hub, empty_catalog, mlflow_store,  # noqa: F811
                                                       tmp_path, value, message):
    files = sae_files(tmp_path)
    cfg = json.loads(files["cfg.json"])
    cfg["metadata"]["lr"] = "LR"
    files["cfg.json"] = json.dumps(cfg).replace('"LR"', value).encode()
    serve(hub, files, registry_json(files))
    assert message in refused_pull(mlflow_store, tmp_path)


# -- the Hub's own listing -------------------------------------------------------------------

def test_download_that_differs_from_the_hub_listing_is_refused(hub, empty_catalog,  # noqa: F811
                                                               mlflow_store, tmp_path):
    files = sae_files(tmp_path)
    serve(hub, files, None)  # a plain SAELens repo: the Hub's listing is all there is to check
    weights = bytearray(files["sae_weights.safetensors"])
    weights[-1] ^= 0xFF
    hub.state.serve_instead(REPO, f"{FOLDER}/sae_weights.safetensors", bytes(weights))
    line = refused_pull(mlflow_store, tmp_path)
    assert (f"{FOLDER}/sae_weights.safetensors downloaded from hf://{REPO}/{FOLDER}@" in line
            and "is not the file the Hub lists at that commit (sha256" in line)
    with pytest.raises(HubError, match="is not the file the Hub lists"):
        load_sae(f"hf://{REPO}/{FOLDER}")


@pytest.mark.parametrize(("name", "why"), [
    ("../escape/cfg.json", "holds '..'"), ("/abs/cfg.json", "is an absolute path"),
    (f"{FOLDER}/../../escape/sae_weights.safetensors", "holds '..'"),
    ("ev\x00il/cfg.json", "holds a control character")])
def test_repo_file_names_that_leave_the_folder_are_refused(hub, empty_catalog, mlflow_store,  # noqa: F811
                                                           tmp_path, name, why):
    files = sae_files(tmp_path)
    serve(hub, files, registry_json(files))
    hub.state.put_files(REPO, {name: files["cfg.json"]})
    hub.state.requests.clear()
    line = refused_pull(mlflow_store, tmp_path)
    assert f"file name {name!r} {why}" in line and f"Hub repo {REPO} at " in line
    assert ("GET", "resolve") not in hub.state.requests  # refused before any download


# -- push ------------------------------------------------------------------------------------

def test_push_of_a_tampered_version_creates_nothing_remote(hub, catalog, mlflow_store,  # noqa: F811
                                                           tmp_path):
    catalog.register_folder(make_sae_folder(tmp_path / "sae"), "tiny")
    weights = next(f for f in catalog.get("tiny@1").files if f.name == "sae_weights.safetensors")
    blob = Path(catalog.store.blob_path(weights.sha256))
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    before = world(mlflow_store, tmp_path)
    line = error_line(sh("sync", "push", "tiny@1", "--repo", REPO), 1)
    assert "checksum mismatch for sae_weights.safetensors (tiny@1" in line
    assert hub.state.requests == [] and hub.state.repos == {}
    assert world(mlflow_store, tmp_path) == before


@pytest.mark.parametrize("path", ["/abs", "/tiny", "/", "../x"])
def test_push_to_an_absolute_or_dotdot_path_is_a_usage_error(hub, catalog, mlflow_store,  # noqa: F811
                                                             tmp_path, path):
    catalog.register_folder(make_sae_folder(tmp_path / "sae"), "tiny")
    before = world(mlflow_store, tmp_path)
    line = error_line(sh("sync", "push", "tiny@1", "--repo", REPO, "--path", path), 2)
    assert f"invalid path in repo {path!r}" in line
    line = error_line(sh("sync", "pull", REPO, "--path", path), 2)
    assert f"invalid path in repo {path!r}" in line
    assert hub.state.requests == [] and hub.state.repos == {}
    assert world(mlflow_store, tmp_path) == before


# -- two pulls at the same moment ------------------------------------------------------------

def _inflight(backend: str) -> int:
    """How many registrations hold the catalog's in-flight lock (they are past every check a
    pull makes before it registers; see saereg.registry.catalog.inflight)."""
    if backend == "postgresql":
        with db.get_engine().connect() as conn:
            return conn.scalar(text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
                "mode = 'ShareLock' AND database = (SELECT oid FROM pg_database WHERE "
                "datname = current_database())"))
    lock = saereg_home() / "catalog.db.inflight"
    if not lock.exists():
        return 0
    inode = f":{lock.stat().st_ino} "
    return sum(1 for line in Path("/proc/locks").read_text().splitlines()
               if "FLOCK" in line and " READ " in line and inode in line)


class WriteLock:
    """Hold the catalog's write lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: inserts into
    language_models, a registration's first write, wait), so that registrations queue there
    while reads go on."""

    def __init__(self, backend: str):
        if backend == "sqlite":
            self.conn = sqlite3.connect(saereg_home() / "catalog.db", isolation_level=None)
            self.conn.execute("BEGIN IMMEDIATE")
            self.release = lambda: (self.conn.rollback(), self.conn.close())
        else:
            self.conn = db.get_engine().connect()
            self.conn.execute(text("LOCK TABLE language_models IN EXCLUSIVE MODE"))
            self.release = lambda: (self.conn.rollback(), self.conn.close())


def test_two_pulls_of_the_same_folder_at_once_add_one_version(hub, empty_catalog, backend,  # noqa: F811
                                                              mlflow_store, tmp_path):
    files = sae_files(tmp_path)
    commit = serve(hub, files, registry_json(files))
    exe = shutil.which("saereg", path=os.path.dirname(sys.executable))
    lock = WriteLock(backend)
    procs = []
    try:
        procs = [subprocess.Popen([exe, "sync", "pull", REPO], env=dict(os.environ),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        deadline = time.time() + 240
        while _inflight(backend) < 2:  # both are past the check, neither has written
            assert time.time() < deadline and all(p.poll() is None for p in procs), \
                [p.communicate() for p in procs if p.poll() is not None]
            time.sleep(0.1)
    finally:
        lock.release()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    said = sorted(re.sub(r"@[0-9a-f]{12}", "@C", out.strip()) for out, _ in outs)
    assert said == [f"hf://{REPO}/{FOLDER}@C: already in the catalog as l6@1",
                    f"hf://{REPO}/{FOLDER}@C: registered as l6@1"]
    counts = table_counts()
    assert (counts["sae_versions"], counts["saes"], counts["publications"]) == (1, 1, 1)
    assert [(v.name, v.version) for v in mlflow_store.search_model_versions()] == [("l6", 1)]
    with db.session() as s:
        assert list(s.execute(select(Publication.repo, Publication.path, Publication.commit))
                    ) == [(REPO, FOLDER, commit)]
