"""Registrations in flight and ``saereg gc``: one shared/exclusive lock per catalog.

A registration stores its files in the artifact store and creates its MLflow model version
before its catalog transaction commits (see :mod:`saereg.registry.catalog.writes`). Until the
commit nothing in the catalog names them, so gc cannot tell them from what a dead process left
behind, whatever their age. So every registration holds this lock *shared*, from before it
stores its first file until its transaction has committed (or its MLflow side has been undone),
and gc holds it *exclusively* while it re-reads what the catalog references and deletes. What gc
finds unreferenced while it holds the lock belongs to no registration in flight; registrations
only wait for each other on the catalog's own write lock, never here.

SQLite catalog: ``flock`` on ``<catalog file>.inflight``. PostgreSQL: a session-level advisory
lock (``pg_advisory_lock_shared`` / ``pg_try_advisory_lock``) on a connection of its own, so it
spans the registration's several transactions and is shared by every client of the database.
Both are released by the kernel or the server when the holder dies, so a killed registration
never blocks gc. Other databases (and platforms without ``fcntl``) get no lock.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from sqlalchemy import text
from sqlalchemy.engine import make_url

from saereg.registry.errors import CatalogBusyError

F = TypeVar("F", bound=Callable)

LOCK_KEY = int.from_bytes(hashlib.sha256(b"saereg: registrations in flight").digest()[:8],
                          "big", signed=True)
"""The PostgreSQL advisory lock key (advisory locks are per database, so per catalog)."""
GC_WAIT_SECONDS = 300.0
"""How long gc waits for registrations in flight to finish before giving up."""


def registration(method: F) -> F:
    """Run a ``Catalog`` method (it has ``self.url``) holding the lock shared."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with registering(self.url):
            return method(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def registering(url: str) -> Iterator[None]:
    """Hold the lock of the catalog at ``url`` shared (waits only while gc holds it)."""
    with _lock(url, exclusive=False, wait=None):
        yield


@contextlib.contextmanager
def collecting(url: str, wait: float = GC_WAIT_SECONDS) -> Iterator[None]:
    """Hold the lock of the catalog at ``url`` exclusively: no registration is in flight until
    this exits. Raises :class:`CatalogBusyError` if registrations kept it for ``wait`` seconds."""
    with _lock(url, exclusive=True, wait=wait):
        yield


def _lock(url: str, *, exclusive: bool, wait: float | None):
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _file(url, parsed.database, exclusive=exclusive, wait=wait)
    if backend == "postgresql":
        return _advisory(url, exclusive=exclusive, wait=wait)
    return contextlib.nullcontext()


def _give_up(url: str, wait: float) -> CatalogBusyError:
    from saereg.registry.catalog.db import safe_url

    return CatalogBusyError(f"gc: registrations into {safe_url(url)} stayed in flight for "
                            f"{wait:.0f} s; run gc again when they are done")


def _poll(try_once: Callable[[], bool], url: str, wait: float) -> None:
    deadline, delay = time.monotonic() + wait, 0.01
    while not try_once():
        if time.monotonic() >= deadline:
            raise _give_up(url, wait)
        time.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, 0.25)


@contextlib.contextmanager
def _file(url: str, database: str | None, *, exclusive: bool,
          wait: float | None) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    if fcntl is None or not database or database == ":memory:":
        yield
        return
    path = os.path.abspath(database) + ".inflight"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:  # each open() is its own lock owner: threads of one process exclude each other too
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        if wait is None:
            fcntl.flock(fd, mode)
        else:
            def try_once() -> bool:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    return False
            _poll(try_once, url, wait)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _advisory(url: str, *, exclusive: bool, wait: float | None) -> Iterator[None]:
    from saereg.registry.catalog.db import get_engine

    kind = "" if exclusive else "_shared"
    conn = get_engine(url).connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        if wait is None:
            conn.execute(text(f"SELECT pg_advisory_lock{kind}(:k)"), {"k": LOCK_KEY})
        else:
            _poll(lambda: bool(conn.execute(text(f"SELECT pg_try_advisory_lock{kind}(:k)"),
                                            {"k": LOCK_KEY}).scalar()), url, wait)
        try:
            yield
        finally:
            try:
                conn.execute(text(f"SELECT pg_advisory_unlock{kind}(:k)"), {"k": LOCK_KEY})
            except Exception:  # noqa: BLE001 - closing the session releases it instead
                conn.invalidate()
    finally:
        conn.close()
