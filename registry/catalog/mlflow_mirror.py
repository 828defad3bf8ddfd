"""The MLflow Model Registry mirror of the catalog.

Every catalog version is also a version of the MLflow registered model named like the SAE:
its source is the run's ``sae/`` artifact (``runs:/<run id>/sae``) or, for versions without a
run, the folder of stored files in the artifact store. Aliases are mirrored. Model versions
carry the tags ``saereg.catalog`` (the catalog's id), ``saereg.uid`` (the catalog version's
id) and ``saereg.version`` (its catalog number), which is how ``saereg gc`` finds MLflow
versions whose catalog transaction never committed.

The catalog drives the order (see :mod:`saereg.registry.catalog.writes`): open the transaction, write here,
commit; undo here if the commit fails. Every failure here is raised as :class:`MirrorError`.

Every opener of a tracking store in this project (this mirror, training's tracker) goes through
:func:`ensure_tracking_store`, which creates a new SQLite store once, whoever comes first.
"""

from __future__ import annotations

import functools
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from saereg.registry.errors import MirrorError, redact
from saereg.registry.paths import mlflow_artifact_root, mlflow_tracking_uri, saereg_home

MANAGED_TAG = "saereg.managed"


def ensure_tracking_store(uri: str | None = None) -> str:
    """The tracking URI to open (``uri``, else :func:`~saereg.registry.paths.mlflow_tracking_uri`),
    with its store ready: a SQLite store that does not exist yet is created here first.

    MLflow creates a SQLite store's tables itself when a client first opens the file, and
    processes that open a new file together race on its migrations (``table _alembic_tmp_...
    already exists``, ``duplicate column``), leaving a half-migrated file that every later open
    fails on. So the file is made once, under the cross-process file lock the catalog takes for
    its own migration (``<file>.lock``): migrated as a temporary file in the same folder and
    linked into place only when complete. A store file that exists is therefore complete, and
    the check costs a ``stat``. Servers and other databases pass through untouched.
    """
    uri = uri or mlflow_tracking_uri()
    path = _sqlite_file(uri)
    if path is None or path.exists():
        return uri
    from saereg.registry.catalog.db import _file_lock

    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(str(path)):
        if not path.exists():  # the first one in creates it; the rest find it made
            for left in path.parent.glob(f".{path.name}.*.creating*"):  # a killed creator's
                left.unlink(missing_ok=True)
            _create_sqlite_store(path)
    return uri


def _sqlite_file(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI (None for other URIs and in-memory databases)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().absolute()


def _create_sqlite_store(path: Path) -> None:
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    # The default experiment's artifacts: next to the home's own store, in the home; for any
    # other file, where MLflow itself would put them.
    home_store = path == (saereg_home() / "mlflow.db").absolute()
    root = mlflow_artifact_root() if home_store else DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.creating")
    tmp_uri = f"sqlite:///{tmp}"
    try:
        store = SqlAlchemyStore(tmp_uri, root)  # runs every migration, adds experiment 0
        store.engine.dispose()
        getattr(SqlAlchemyStore, "_engine_map", {}).pop(tmp_uri, None)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces a file someone else put there meanwhile
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links: the lock still keeps us alone
            if not path.exists():
                os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        for leftover in (tmp, *(tmp.with_name(tmp.name + s) for s in ("-journal", "-wal", "-shm"))):
            leftover.unlink(missing_ok=True)


class MlflowMirror:
    def __init__(self, tracking_uri: str | None = None):
        self.uri = tracking_uri or mlflow_tracking_uri()

    @functools.cached_property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=ensure_tracking_store(self.uri))

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except MirrorError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the MLflow side
            first = redact((str(e).strip().splitlines() or [type(e).__name__])[0])[:400]
            raise MirrorError(f"MLflow model registry at {redact(self.uri)}: {what} failed: "
                              f"{first}") from e

    def warm(self) -> None:
        """Open the MLflow stores now (a fresh process spends a moment here), so that the
        catalog's write lock is not held meanwhile; fails early if MLflow is unreachable."""
        with self._errors("connecting"):
            self.client.search_registered_models(max_results=1)

    def create_version(self, name: str, source: str, run_id: str | None,
                       tags: dict[str, str], description: str = "") -> tuple[str, bool]:
        """Create a model version; returns (MLflow version, whether the model was created)."""
        from mlflow.exceptions import MlflowException

        created = False
        with self._errors(f"registering a version of {name!r}"):
            try:
                self.client.get_registered_model(name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                self.client.create_registered_model(
                    name, tags={MANAGED_TAG: "true"},
                    description="SAE versions mirrored from the sae-registry catalog")
                created = True
            try:
                mv = self.client.create_model_version(name, source, run_id=run_id, tags=tags,
                                                       description=description or None,
                                                       await_creation_for=0)
            except BaseException:
                if created:
                    self._quiet(self.client.delete_registered_model, name)
                raise
        return str(mv.version), created

    def delete_version(self, name: str, version: str, drop_model: bool = False) -> None:
        """Undo :meth:`create_version` (best effort: what cannot be undone now is left for
        ``saereg gc``, with a warning)."""
        if not self._quiet(self.client.delete_model_version, name, version):
            warnings.warn(f"MLflow version {version} of {name!r} could not be removed after the "
                          "catalog side failed; `saereg gc` will remove it", stacklevel=3)
        elif drop_model:
            self._quiet(self.client.delete_registered_model, name)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        with self._errors(f"setting alias {alias!r} of {name!r}"):
            self.client.set_registered_model_alias(name, alias, version)

    def delete_alias(self, name: str, alias: str) -> None:
        from mlflow.exceptions import MlflowException

        with self._errors(f"deleting alias {alias!r} of {name!r}"):
            try:
                self.client.delete_registered_model_alias(name, alias)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise

    def set_version_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        with self._errors(f"tagging version {version} of {name!r}"):
            for key, value in tags.items():
                self.client.set_model_version_tag(name, version, key, value)

    def delete_version_tags(self, name: str, version: str, keys: list[str]) -> None:
        with self._errors(f"untagging version {version} of {name!r}"):
            for key in keys:
                self.client.delete_model_version_tag(name, version, key)

    def stale_versions(self, catalog_id: str, known_uids: set[str],
                       min_age: float) -> list[tuple[str, str, str]]:
        """(name, version, uid) of MLflow versions made for this catalog whose uid is not in
        ``known_uids`` (a registration in flight, or one whose process died between the two
        writes), at least ``min_age`` seconds old."""
        with self._errors("listing model versions"):
            versions = self.client.search_model_versions(
                f"tags.`saereg.catalog` = '{catalog_id}'")
        now_ms = time.time() * 1000
        return [(v.name, str(v.version), v.tags.get("saereg.uid", "")) for v in versions
                if v.tags.get("saereg.catalog") == catalog_id
                and v.tags.get("saereg.uid", "") not in known_uids
                and now_ms - (v.creation_timestamp or 0) >= min_age * 1000]

    @staticmethod
    def _quiet(fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except Exception:  # noqa: BLE001 - compensation must not hide the original error
            return False
