"""The catalog database: URL, engines, sessions, schema check and retries.

``SAEREG_DATABASE_URL`` points the catalog at any SQLAlchemy URL (PostgreSQL for teams); the
default is an embedded SQLite file, ``$SAEREG_HOME/catalog.db``.

SQLite runs in WAL mode with foreign keys on and a busy timeout; SQLAlchemy emits ``BEGIN``
itself (the sqlite3 driver's legacy transaction handling is switched off), so write sessions
start with ``BEGIN IMMEDIATE`` and take the write lock up front instead of failing half-way.
The embedded SQLite catalog migrates itself on first use; a PostgreSQL catalog is never
migrated silently: it must be at the head revision, or every operation stops with one error
that says to run ``saereg db upgrade``.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session

from saereg.registry.errors import (CatalogBusyError, CatalogNotMigratedError,
                                    CatalogUnavailableError, UsageError, redact)
from saereg.registry.paths import saereg_home

T = TypeVar("T")

BUSY_TIMEOUT_MS = 30_000
"""How long SQLite waits for the write lock inside one attempt."""
RETRY_ATTEMPTS = 10
RETRY_SQLSTATES = {"40001", "40P01", "55P03"}  # serialization failure, deadlock, lock not available
RETRY_MESSAGES = ("database is locked", "database table is locked", "database is busy")

_engines: dict[tuple[str, int], Engine] = {}
_checked: set[tuple[str, int]] = set()


def database_url() -> str:
    """``SAEREG_DATABASE_URL``, or the SQLite catalog in ``$SAEREG_HOME``."""
    url = os.environ.get("SAEREG_DATABASE_URL")
    if url:
        return url
    return _default_url()


URL_EXAMPLES = ("postgresql+psycopg://localhost:5432/saereg", "sqlite:////path/to/catalog.db")


def safe_url(url: str) -> str:
    """The URL with any password hidden (for messages)."""
    try:
        return redact(make_url(url).render_as_string(hide_password=True))
    except Exception:  # noqa: BLE001 - an unparsable URL is shown without its credentials part
        return redact(url.split("@")[-1])


def _url_source(url: str) -> str:
    """What set ``url``, for messages: the environment variable, or the caller."""
    return ("SAEREG_DATABASE_URL" if url == os.environ.get("SAEREG_DATABASE_URL")
            else "the catalog database URL")


def get_engine(url: str | None = None, *, check_schema: bool = True) -> Engine:
    """The engine for ``url`` (one per URL and process); checks the schema on first use."""
    url = url or database_url()
    key = (url, os.getpid())
    engine = _engines.get(key)
    if engine is None:
        engine = _engines[key] = _create_engine(url)
    if check_schema and key not in _checked:
        ensure_schema(engine)
        _checked.add(key)
    return engine


def dispose_all() -> None:
    """Close every pooled connection this process holds (tests, forks)."""
    for (url, pid), engine in list(_engines.items()):
        if pid == os.getpid():
            engine.dispose()
        _engines.pop((url, pid), None)
        _checked.discard((url, pid))


def _create_engine(url: str) -> Engine:
    source = _url_source(url)
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() != "sqlite":
            engine = create_engine(url, pool_pre_ping=True)
        else:
            _check_sqlite_folder(url, parsed.database, source)
            engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
    except (ArgumentError, NoSuchModuleError, ValueError) as e:
        raise UsageError(
            f"{source}={redact(url)!r} is not a database URL this installation can use "
            f"({redact(' '.join(str(e).split()))}); examples: {', '.join(URL_EXAMPLES)}"
        ) from None
    except ImportError as e:
        raise UsageError(f"{source}={safe_url(url)!r} needs the database driver "
                         f"{e.name or e}, which is not installed") from None
    _explain_connect_errors(engine, parsed, source)
    if parsed.get_backend_name() != "sqlite":
        return engine

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN (see _on_begin)
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys = ON")
            _ensure_wal(cur, parsed.database)
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        write = conn.get_execution_options().get("saereg_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _check_sqlite_folder(url: str, database: str | None, source: str) -> None:
    """The folder of a SQLite catalog file must exist and be writable (SQLite writes its WAL
    and lock files beside the catalog). Only the default catalog's folder, in SAEREG_HOME, is
    created; a folder that another URL names is more likely a typo than a wish."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    folder = os.path.dirname(os.path.abspath(database))
    if (not os.path.isdir(folder) and not os.environ.get("SAEREG_DATABASE_URL")
            and url == _default_url()):  # the default catalog: its folder, SAEREG_HOME, is made
        return
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise CatalogUnavailableError(
            f"cannot open the SQLite catalog {database}: its folder {folder} {what}; "
            f"create the folder or fix {source}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CatalogUnavailableError(
            f"cannot open the SQLite catalog {database}: its folder {folder} is not writable "
            f"(SQLite writes its journal there); fix the permissions or {source}")


def _default_url() -> str:
    try:
        home = saereg_home()
    except OSError as e:
        raise CatalogUnavailableError(
            f"cannot create SAEREG_HOME {e.filename or ''}: {e.strerror or e}; point "
            "SAEREG_HOME at a folder you can write, or set SAEREG_DATABASE_URL") from None
    return f"sqlite:///{home / 'catalog.db'}"


def _explain_connect_errors(engine: Engine, parsed: URL, source: str) -> None:
    """Turn a failure to connect (refused, unknown host, bad password, unopenable file) into
    one :class:`CatalogUnavailableError` naming the host and port, or the file, with the
    credentials redacted. Errors on an open connection, busy answers and the pool's
    pre-ping (which reconnects by itself) pass through unchanged."""
    password = parsed.password

    @event.listens_for(engine, "handle_error")
    def _on_error(ctx) -> None:  # ctx: an ExceptionContext
        if ctx.connection is not None or ctx.is_pre_ping or is_retryable(ctx.original_exception):
            return
        reason = redact(" ".join(str(ctx.original_exception).split()), password)
        if parsed.get_backend_name() == "sqlite":
            path = os.path.abspath(parsed.database or "")
            if os.path.isdir(path):
                hint = "it is a folder, not a file"
            elif "not a database" in reason:
                hint = "it is not an SQLite file"
            else:
                hint = f"check that its folder {os.path.dirname(path)} is writable"
            raise CatalogUnavailableError(
                f"cannot open the SQLite catalog {path} ({source}): {reason}; {hint}") from None
        port = parsed.port or {"postgresql": 5432, "mysql": 3306}.get(parsed.get_backend_name())
        where = (parsed.host or "localhost") + (f":{port}" if port else "")
        raise CatalogUnavailableError(
            f"cannot connect to the catalog database at {where} ({safe_url(str(parsed))}, "
            f"from {source}): {reason}") from None


@contextlib.contextmanager
def session(url: str | None = None, *, write: bool = False) -> Iterator[Session]:
    """A session inside one transaction, committed on exit, rolled back on any error.

    ``write=True`` takes SQLite's write lock at ``BEGIN`` (``BEGIN IMMEDIATE``), so concurrent
    writers queue on the busy timeout instead of failing when they first write.
    """
    engine = get_engine(url)
    bind = engine.execution_options(saereg_write=True) if write else engine
    with Session(bind, expire_on_commit=False, autoflush=False) as s, s.begin():
        yield s


def is_retryable(exc: BaseException) -> bool:
    """A lock timeout, serialization failure or deadlock: the transaction may simply be re-run."""
    orig = getattr(exc, "orig", None) or exc
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state in RETRY_SQLSTATES:
        return True
    msg = str(orig).lower()
    return any(m in msg for m in RETRY_MESSAGES)


def retrying(fn: Callable[[], T], *, what: str = "catalog write",
             attempts: int = RETRY_ATTEMPTS) -> T:
    """Run ``fn`` (one whole transaction) again, with jittered backoff, while it fails with a
    retryable database error; after the last attempt raise :class:`CatalogBusyError`."""
    delay = 0.05
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except DBAPIError as e:
            if not is_retryable(e):
                raise
            if attempt == attempts:
                raise CatalogBusyError(
                    f"{what}: the catalog stayed busy through {attempts} attempts "
                    "(another process holds a long write transaction); try again") from None
        time.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


# -- schema ---------------------------------------------------------------------------------

def ensure_schema(engine: Engine) -> None:
    """Make sure the catalog is at the head revision.

    SQLite: migrate (under a file lock, so concurrent first uses migrate once). Any other
    database: raise :class:`CatalogNotMigratedError` naming the command to run.
    """
    from saereg.registry.catalog import migrate

    head = migrate.head_revision()
    current = migrate.current_revision(engine)
    if current == head:
        return
    if current is not None and current not in migrate.known_revisions():
        raise CatalogNotMigratedError(
            f"catalog {safe_url(str(engine.url))} is at schema revision {current}, which this "
            "version of sae-registry does not know (it was made by a newer one); upgrade "
            "sae-registry")
    if engine.dialect.name == "sqlite":
        with _file_lock(engine.url.database):
            if migrate.current_revision(engine) != head:
                migrate.upgrade_engine(engine, "head")
        return
    state = "is empty" if current is None else f"is at revision {current}"
    raise CatalogNotMigratedError(
        f"catalog {safe_url(str(engine.url))} {state}; this version needs revision {head}. "
        "Run `saereg db upgrade` (with the same SAEREG_DATABASE_URL) to migrate it")


def _ensure_wal(cur, database: str | None) -> None:  # noqa: ANN001 - a sqlite3 cursor
    """Switch the catalog file to WAL (a persistent setting of the file) once.

    The switch needs an exclusive lock, and SQLite answers "database is locked" at once,
    without waiting on the busy timeout, when another connection holds the file (as when
    several processes open a brand-new catalog together). So the switch runs under the
    catalog's file lock, and a busy answer is retried with backoff.
    """
    delay = 0.02
    for attempt in range(1, RETRY_ATTEMPTS * 4 + 1):
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            with _file_lock(database):
                cur.execute("PRAGMA journal_mode = WAL")
            return
        except Exception as e:  # noqa: BLE001 - sqlite3.OperationalError, without importing it
            if not is_retryable(e) or attempt == RETRY_ATTEMPTS * 4:
                raise
        time.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, 0.5)


_path_locks: dict[str, threading.RLock] = {}
_held_counts: dict[str, int] = {}
_path_locks_guard = threading.Lock()


@contextlib.contextmanager
def _file_lock(database: str | None) -> Iterator[None]:
    """An exclusive lock on ``<catalog>.lock`` next to a SQLite catalog file.

    Re-entrant within one thread (a migration under the lock opens new connections, whose
    set-up takes the lock again); other threads and other processes wait.
    """
    if not database or database == ":memory:":
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: SQLite's own lock has to do
        yield
        return
    path = os.path.abspath(database) + ".lock"
    with _path_locks_guard:
        local = _path_locks.setdefault(path, threading.RLock())
    with local:
        if _held_counts.get(path):
            _held_counts[path] += 1
            try:
                yield
            finally:
                _held_counts[path] -= 1
            return
        with open(path, "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            _held_counts[path] = 1
            try:
                yield
            finally:
                _held_counts[path] = 0
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
