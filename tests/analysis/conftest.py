"""Fixtures for feature-catalog tests: the catalog on SQLite (a fresh file per test) and on
PostgreSQL when ``SAEREG_TEST_POSTGRES_URL`` is set (one database per session, emptied between
tests), and an SAE registered for the tiny LLaMA's ``model.layers.1``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "registry"))
from catalog_helpers import BACKENDS, migrated_pg_database, use_backend
from feature_helpers import register_tiny_sae


@pytest.fixture(scope="session")
def analysis_pg_url():
    yield from migrated_pg_database("saereg_feat")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch, mlflow_store):
    yield from use_backend(request, monkeypatch, "analysis_pg_url")


@pytest.fixture
def tiny_sae(backend, tiny_model_dir, tmp_path):
    return register_tiny_sae(tiny_model_dir, tmp_path)
