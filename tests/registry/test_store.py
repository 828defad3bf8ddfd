"""The content-addressed artifact store on a local directory and through fsspec (its real
in-memory filesystem): identical content is stored once, read-only, and re-verified when
reused (a corrupt blob is rewritten); trees are hard links to the blobs; reads verify every
byte; a whole registration and load work with the store at an fsspec URL, and `gc` there
removes only unreferenced blobs and stale temporary files."""

from __future__ import annotations

import os
import secrets
import stat

import pytest
from catalog_helpers import make_sae_folder, sha256_of

from saereg.registry.api import gc, load_sae
from saereg.registry.catalog.store import ArtifactStore, StoredFile, tree_id
from saereg.registry.catalog.writes import Catalog
from saereg.registry.errors import ChecksumError, SaeRegError


def test_local_blobs_are_deduplicated_read_only_and_verified(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(10_000))
    f1 = store.put(src)
    f2 = store.put(src, "renamed.bin")
    assert f1.sha256 == f2.sha256 == sha256_of(src) and f2.name == "renamed.bin"
    assert [sha for sha, _ in store.iter_blobs()] == [f1.sha256]
    blob = store.blob_path(f1.sha256)
    assert stat.S_IMODE(os.stat(blob).st_mode) == 0o444
    assert list(store.iter_tmp()) == []

    store.verify(f1)
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as fh:
        fh.write(b"\x00\x01\x02")
    with pytest.raises(ChecksumError, match=f"expected sha256 {f1.sha256}"):
        store.verify(f1)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ChecksumError):
        store.materialize([f1], out)
    assert not (out / "a.bin").exists()  # no half-verified copy is left behind
    store.put(src)  # the same content again repairs the blob
    store.verify(f1)
    with pytest.raises(SaeRegError, match="missing from the artifact store"):
        store.verify(StoredFile("gone.bin", "0" * 64, 1))


def test_trees_are_hard_links_named_by_their_listing(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    files = []
    for name in ("cfg.json", "w.bin"):
        (tmp_path / name).write_bytes(os.urandom(100))
        files.append(store.put(tmp_path / name))
    tid = store.put_tree(files)
    assert tid == tree_id(files) == store.put_tree(list(reversed(files)))
    for f in files:
        linked = os.path.join(store.tree_path(tid), f.name)
        assert os.stat(linked).st_ino == os.stat(store.blob_path(f.sha256)).st_ino
    assert store.tree_url(tid).startswith("file://")


def test_fsspec_store_end_to_end(backend, mlflow_store, tmp_path):
    pytest.importorskip("fsspec")
    url = f"memory://saereg-{secrets.token_hex(4)}"
    cat = Catalog(store_url=url)
    folder = make_sae_folder(tmp_path / "s", seed=3)
    v = cat.register_folder(folder, "remote")
    assert v.artifact_uri == url
    sae = load_sae("remote@1")
    assert sae.cfg.d_sae == 64

    store = ArtifactStore(url)
    weights = next(f for f in v.files if f.name == "sae_weights.safetensors")
    with store.fs.open(store.blob_path(weights.sha256), "rb") as fh:
        data = bytearray(fh.read())
    data[-5] ^= 0xFF
    with store.fs.open(store.blob_path(weights.sha256), "wb") as fh:
        fh.write(bytes(data))
    with pytest.raises(ChecksumError, match="sae_weights.safetensors"):
        load_sae("remote@1")

    other = make_sae_folder(tmp_path / "o", seed=9)
    orphan = store.put(other / "sae_weights.safetensors")
    with store.fs.open(f"{store.root}/tmp/left-behind.part", "wb") as fh:
        fh.write(b"partial")
    report = gc(min_age=0, store_url=url)
    assert report.blobs == [orphan.sha256] and len(report.temporary) == 1
    assert {sha for sha, _ in store.iter_blobs()} == {f.sha256 for f in v.files}
    assert list(store.iter_tmp()) == []
