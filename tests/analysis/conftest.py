"""Fixtures for feature-catalog tests: the catalog on SQLite (a fresh file per test) and on
PostgreSQL when ``SAEREG_TEST_POSTGRES_URL`` is set (one database per session, emptied between
tests), and an SAE registered for the tiny LLaMA's ``model.layers.1``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "registry"))
from catalog_helpers import (
    CATALOG_TABLES,
    PG_SERVER,
    create_pg_database,
    drop_pg_database,
)
from feature_helpers import register_tiny_sae

BACKENDS = ["sqlite", pytest.param("postgresql", marks=[
    pytest.mark.postgres,
    pytest.mark.skipif(not PG_SERVER, reason="SAEREG_TEST_POSTGRES_URL is not set")])]


@pytest.fixture(scope="session")
def analysis_pg_url():
    from saereg.registry.catalog import db
    from saereg.registry.catalog import migrate

    url = create_pg_database("saereg_feat")
    try:
        migrate.upgrade_engine(db.get_engine(url, check_schema=False), "head")
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch, mlflow_store):
    from saereg.registry.catalog import db

    monkeypatch.delenv("SAEREG_DATABASE_URL", raising=False)
    if request.param == "postgresql":
        from sqlalchemy import text

        url = request.getfixturevalue("analysis_pg_url")
        monkeypatch.setenv("SAEREG_DATABASE_URL", url)
        with db.get_engine(url).begin() as conn:
            conn.execute(text(f"TRUNCATE {', '.join(CATALOG_TABLES)} RESTART IDENTITY CASCADE"))
    yield request.param
    db.dispose_all()


@pytest.fixture
def tiny_sae(backend, tiny_model_dir, tmp_path):
    return register_tiny_sae(tiny_model_dir, tmp_path)
