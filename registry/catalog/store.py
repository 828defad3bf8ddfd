"""The artifact store: files kept under their sha256, verified on every read.

Layout under the store root (a local directory, or any fsspec URL such as ``s3://bucket/saereg``
with the ``s3`` extra installed)::

    sha256/ab/abcdef...    one blob per distinct file content (read-only)
    trees/<tree id>/       a version's files under their own names (hard links to the blobs
                           where possible), made for versions that have no MLflow run so the
                           MLflow model version has a folder to point at
    tmp/                   files being written; renamed into place when complete

The default root is ``$SAEREG_ARTIFACT_STORE`` or ``$SAEREG_HOME/artifacts``. Blobs are written
before the catalog commits the version that names them; a crash in between leaves only an
unreferenced blob, which ``saereg gc`` removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from saereg.registry.errors import ChecksumError, SaeRegError
from saereg.registry.paths import saereg_home

CHUNK = 4 << 20


@dataclass(frozen=True)
class StoredFile:
    name: str
    sha256: str
    size: int


def default_store_url() -> str:
    url = os.environ.get("SAEREG_ARTIFACT_STORE")
    return url or (saereg_home() / "artifacts").as_uri()


def _local_path(url: str) -> Path | None:
    if "://" not in url:
        return Path(url).expanduser().resolve()
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return None


def tree_id(files: Iterable[StoredFile]) -> str:
    listing = sorted((f.name, f.sha256) for f in files)
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


class ArtifactStore:
    """Content-addressed files at ``url`` (local path, ``file://`` or an fsspec URL)."""

    def __init__(self, url: str | None = None):
        url = url or default_store_url()
        self.local = _local_path(url)
        if self.local is not None:
            self.url = self.local.as_uri()
            self.fs, self.root = None, str(self.local)
        else:
            try:
                import fsspec
            except ImportError as e:
                raise SaeRegError(f"artifact store {url} needs fsspec: pip install "
                                  "'sae-registry[s3]' (or fsspec and the filesystem for this "
                                  "URL)") from e
            self.url = url.rstrip("/")
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
            self.root = self.root.rstrip("/")

    # -- paths ----------------------------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return "/".join([self.root, *parts]) if self.fs else os.path.join(self.root, *parts)

    def blob_path(self, sha256: str) -> str:
        return self._join("sha256", sha256[:2], sha256)

    def tree_path(self, tid: str) -> str:
        return self._join("trees", tid)

    def tree_url(self, tid: str) -> str:
        return (self.local / "trees" / tid).as_uri() if self.local else f"{self.url}/trees/{tid}"

    # -- writing --------------------------------------------------------------------------
    def put(self, src: str | Path, name: str | None = None) -> StoredFile:
        """Store one file (hashing while copying); an existing blob that checks out is reused."""
        src = Path(src)
        tmp = self._join("tmp", f"{uuid.uuid4().hex}.part")
        h = hashlib.sha256()
        self._makedirs(self._join("tmp"))
        size = 0
        try:
            with open(src, "rb") as fin, self._open(tmp, "wb") as fout:
                while chunk := fin.read(CHUNK):
                    h.update(chunk)
                    fout.write(chunk)
                    size += len(chunk)
                if self.fs is None:
                    fout.flush()
                    os.fsync(fout.fileno())
            sha = h.hexdigest()
            dest = self.blob_path(sha)
            if self._exists(dest) and self._hash(dest) == sha:
                self._remove(tmp)
                self._touch(dest)
            else:
                self._makedirs(self._join("sha256", sha[:2]))
                self._rename(tmp, dest)
                if self.fs is None:
                    os.chmod(dest, 0o444)
        except BaseException:
            self._remove(tmp)
            raise
        return StoredFile(name or src.name, sha, size)

    def put_tree(self, files: list[StoredFile]) -> str:
        """A folder of the files under their names; its id hashes the (name, sha256) listing."""
        tid = tree_id(files)
        dest = self.tree_path(tid)
        if self._exists(dest):
            self._touch(dest)
            return tid
        tmp = self._join("tmp", f"tree-{uuid.uuid4().hex}")
        self._makedirs(tmp)
        try:
            for f in files:
                src, out = self.blob_path(f.sha256), f"{tmp}/{f.name}"
                if self.fs is None:
                    try:
                        os.link(src, out)
                    except OSError:
                        shutil.copyfile(src, out)
                else:
                    self.fs.copy(src, out)
            self._makedirs(self._join("trees"))
            try:
                self._rename(tmp, dest)
            except OSError:
                if not self._exists(dest):  # lost a race with an identical tree: fine
                    raise
        finally:
            if self._exists(tmp):
                self._remove(tmp, recursive=True)
        return tid

    # -- reading --------------------------------------------------------------------------
    def verify(self, f: StoredFile, where: str = "") -> None:
        """Hash the stored blob; raise :class:`ChecksumError` naming the file and both hashes."""
        path = self.blob_path(f.sha256)
        if not self._exists(path):
            raise SaeRegError(f"{f.name}{' of ' + where if where else ''} is missing from the "
                              f"artifact store {self.url} (blob {f.sha256})")
        actual = self._hash(path)
        if actual != f.sha256:
            raise ChecksumError(f.name, f.sha256, actual,
                                where=f"{where}, blob {path}".lstrip(", "))

    def materialize(self, files: list[StoredFile], dest: str | Path, *, link: bool = False,
                    where: str = "") -> Path:
        """Write verified copies of ``files`` into the existing folder ``dest``.

        ``link=True`` (local stores only) verifies each blob and symlinks it instead of copying;
        for reading right away, not for handing the folder out.
        """
        dest = Path(dest)
        for f in files:
            out = dest / f.name
            if link and self.fs is None:
                self.verify(f, where)
                os.symlink(self.blob_path(f.sha256), out)
                continue
            h = hashlib.sha256()
            path = self.blob_path(f.sha256)
            if not self._exists(path):
                self.verify(f, where)  # raises the "missing" error
            with self._open(path, "rb") as fin, open(out, "wb") as fout:
                while chunk := fin.read(CHUNK):
                    h.update(chunk)
                    fout.write(chunk)
            if h.hexdigest() != f.sha256:
                out.unlink()
                raise ChecksumError(f.name, f.sha256, h.hexdigest(),
                                    where=f"{where}, blob {path}".lstrip(", "))
        return dest

    # -- garbage collection ---------------------------------------------------------------
    def iter_blobs(self) -> Iterator[tuple[str, float | None]]:
        """(sha256, modification time or None) of every blob."""
        for path in self._listdir(self._join("sha256"), depth=2):
            name = path.rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1]
            if len(name) == 64:
                yield name, self._mtime(path)

    def iter_trees(self) -> Iterator[tuple[str, float | None]]:
        for path in self._listdir(self._join("trees"), depth=1):
            yield path.rstrip("/").rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1], self._mtime(path)

    def iter_tmp(self) -> Iterator[tuple[str, float | None]]:
        for path in self._listdir(self._join("tmp"), depth=1):
            yield path, self._mtime(path)

    def blob_mtime(self, sha256: str) -> float | None:
        return self._mtime(self.blob_path(sha256))

    def delete_blob(self, sha256: str) -> None:
        self._remove(self.blob_path(sha256))

    def delete_tree(self, tid: str) -> None:
        self._remove(self.tree_path(tid), recursive=True)

    def delete_tmp(self, path: str) -> None:
        self._remove(path, recursive=True)

    # -- backend primitives (local os calls, or fsspec) -----------------------------------
    def _open(self, path: str, mode: str):
        return open(path, mode) if self.fs is None else self.fs.open(path, mode)

    def _exists(self, path: str) -> bool:
        return os.path.lexists(path) if self.fs is None else self.fs.exists(path)

    def _makedirs(self, path: str) -> None:
        if self.fs is None:
            os.makedirs(path, exist_ok=True)
        else:
            self.fs.makedirs(path, exist_ok=True)

    def _rename(self, src: str, dest: str) -> None:
        if self.fs is None:
            os.rename(src, dest) if os.path.isdir(src) else os.replace(src, dest)
        else:
            self.fs.mv(src, dest, recursive=True)

    def _remove(self, path: str, recursive: bool = False) -> None:
        try:
            if self.fs is not None:
                if self.fs.exists(path):
                    self.fs.rm(path, recursive=recursive)
            elif os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.unlink(path)
        except FileNotFoundError:
            pass

    def _touch(self, path: str) -> None:
        if self.fs is None:
            try:
                os.utime(path)
            except OSError:
                pass

    def _hash(self, path: str) -> str:
        h = hashlib.sha256()
        with self._open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def _mtime(self, path: str) -> float | None:
        if self.fs is None:
            try:
                return os.lstat(path).st_mtime
            except OSError:
                return None
        try:
            return self.fs.modified(path).timestamp()
        except Exception:  # noqa: BLE001 - not every filesystem reports times
            return None

    def _listdir(self, path: str, depth: int) -> list[str]:
        if self.fs is None:
            if not os.path.isdir(path):
                return []
            out = [os.path.join(path, n) for n in os.listdir(path)]
            if depth > 1:
                out = [p for d in out if os.path.isdir(d) for p in self._listdir(d, depth - 1)]
            return out
        if not self.fs.exists(path):
            return []
        out = [p["name"] if isinstance(p, dict) else p for p in self.fs.ls(path, detail=False)]
        if depth > 1:
            out = [p for d in out if self.fs.isdir(d) for p in self._listdir(d, depth - 1)]
        return out


def age_ok(mtime: float | None, min_age: float) -> bool:
    """Old enough to collect (unknown ages only when no minimum age was asked)."""
    if mtime is None:
        return min_age <= 0
    return time.time() - mtime >= min_age
