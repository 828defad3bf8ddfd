"""Fixtures for catalog tests (the MLflow store fixtures live in tests/conftest.py): the catalog
on SQLite (a fresh file per test) and on PostgreSQL when
``SAEREG_TEST_POSTGRES_URL`` is set (a database created for the session and dropped after it,
emptied between tests), and helpers that write SAE folders and MLflow runs the way a training
job does."""

from __future__ import annotations


import pytest
from catalog_helpers import (
    BACKENDS,
    PG_SERVER,
    create_pg_database,
    drop_pg_database,
    migrated_pg_database,
    use_backend,
)


# -- PostgreSQL --------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pg_session_url():
    """A PostgreSQL catalog for this test session, migrated to head."""
    if not PG_SERVER:
        pytest.skip("SAEREG_TEST_POSTGRES_URL is not set")
    yield from migrated_pg_database()


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
    yield from use_backend(request, monkeypatch, "pg_session_url")


@pytest.fixture
def catalog(backend, mlflow_store):
    from saereg.registry.catalog.writes import Catalog

    return Catalog()
