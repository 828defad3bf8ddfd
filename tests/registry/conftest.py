"""Fixtures for catalog tests (the MLflow store fixtures live in tests/conftest.py): the catalog
on SQLite (a fresh file per test) and on PostgreSQL when
``SAEREG_TEST_POSTGRES_URL`` is set (a database created for the session and dropped after it,
emptied between tests), and helpers that write SAE folders and MLflow runs the way a training
job does."""

from __future__ import annotations


import pytest
from catalog_helpers import CATALOG_TABLES, PG_SERVER, create_pg_database, drop_pg_database

BACKENDS = ["sqlite", pytest.param("postgresql", marks=[
    pytest.mark.postgres,
    pytest.mark.skipif(not PG_SERVER, reason="SAEREG_TEST_POSTGRES_URL is not set")])]


# -- PostgreSQL --------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pg_session_url():
    """A PostgreSQL catalog for this test session, migrated to head."""
    if not PG_SERVER:
        pytest.skip("SAEREG_TEST_POSTGRES_URL is not set")
    from saereg.registry.catalog import db
    from saereg.registry.catalog import migrate

    url = create_pg_database()
    try:
        migrate.upgrade_engine(db.get_engine(url, check_schema=False), "head")
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture
def pg_empty_url():
    """A fresh, empty PostgreSQL database, dropped after the test."""
    if not PG_SERVER:
        pytest.skip("SAEREG_TEST_POSTGRES_URL is not set")
    url = create_pg_database("saereg_mig")
    yield url
    drop_pg_database(url)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """The catalog backend of this test: "sqlite" (a fresh file in SAEREG_HOME) or
    "postgresql" (the session database, emptied). Sets SAEREG_DATABASE_URL accordingly."""
    from saereg.registry.catalog import db

    monkeypatch.delenv("SAEREG_DATABASE_URL", raising=False)
    if request.param == "postgresql":
        from sqlalchemy import text

        url = request.getfixturevalue("pg_session_url")
        monkeypatch.setenv("SAEREG_DATABASE_URL", url)
        with db.get_engine(url).begin() as conn:
            conn.execute(text(f"TRUNCATE {', '.join(CATALOG_TABLES)} RESTART IDENTITY CASCADE"))
    yield request.param
    db.dispose_all()


@pytest.fixture
def catalog(backend, mlflow_store):
    from saereg.registry.catalog.writes import Catalog

    return Catalog()
