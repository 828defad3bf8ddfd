"""Helpers for catalog tests: SAE folders and MLflow runs written the way a training job
writes them, file hashes and row counts, PostgreSQL databases made for tests, and the catalog
backend (SQLite or PostgreSQL) that the registry and analysis fixtures share."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CATALOG_TABLES = ("version_evals", "feature_neighbors", "steering_runs", "steering_presets", "label_embeddings", "feature_labels", "feature_stats",
                  "stats_runs", "publications", "version_notes", "version_tags", "features", "alias_events",
                  "aliases", "version_files", "sae_versions", "saes", "language_models")
TRACKING_EXPERIMENT = "sae-registry"
PG_SERVER = os.environ.get("SAEREG_TEST_POSTGRES_URL")


def make_sae_folder(path: Path, *, d_in: int = 16, d_sae: int = 64, arch: str = "topk",
                    k: int | None = 4, seed: int = 0, model: str = "tiny-llama",
                    hook: str = "model.layers.1", sparsity: bool = True,
                    extra_metadata: dict | None = None) -> Path:
    """An SAE folder as ``saereg.registry.sae.folder.save_sae`` writes it (random weights)."""
    import torch

    from saereg.registry.sae.folder import save_sae
    from saereg.registry.sae.modules import K_ARCHITECTURES, SAEConfig, build_sae

    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch,
                    k=k if arch in K_ARCHITECTURES else None,
                    metadata={"model_name": model, "hook_name": hook, **(extra_metadata or {})})
    sae = build_sae(cfg, seed=seed)
    rates = None
    if sparsity:
        g = torch.Generator().manual_seed(seed)
        rates = -torch.rand(d_sae, generator=g) * 6
    return save_sae(sae, path, log_sparsity=rates, overwrite=True)


def log_training_run(client, folder_parent: Path, *, seed: int = 0, d_sae: int = 64, k: int = 4,
                     hook: str = "model.layers.1", model: str = "tiny-llama",
                     metrics: dict[str, float] | None = None, tokens: int = 32768) -> str:
    """An MLflow run shaped like a training job's SAE run: params job.* and sae.*, tags model,
    hook, architecture, saereg.job_id, final eval metrics, and the SAE folder as ``sae/``."""
    from mlflow.entities import Metric, Param

    from saereg.registry.paths import mlflow_artifact_root

    exp = client.get_experiment_by_name(TRACKING_EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        TRACKING_EXPERIMENT, artifact_location=f"{mlflow_artifact_root()}/{TRACKING_EXPERIMENT}")
    run = client.create_run(exp_id, run_name=f"topk-k{k}-s{seed}", tags={
        "model": model, "hook": hook, "architecture": "topk", "saereg.job_id": "job-test"})
    rid = run.info.run_id
    folder = make_sae_folder(folder_parent / rid, d_sae=d_sae, k=k, seed=seed, model=model,
                             hook=hook, extra_metadata={
                                 "mlflow_run_id": rid, "dataset_path": "saereg:default-corpus",
                                 "training_tokens": tokens, "context_size": 64})
    params = {"job.model": model, "job.dataset": "", "job.tokens": str(tokens),
              "job.context_size": "64", "sae.hook": hook, "sae.architecture": "topk",
              "sae.k": str(k), "sae.expansion": str(d_sae // 16), "sae.seed": str(seed)}
    final = {"eval/explained_variance": 0.8, "eval/l0": float(k), "eval/ce_loss_score": 0.9,
             "eval/kl_div": 0.05, "eval/mse": 0.1, "eval/shrinkage": 0.95,
             "final/dead_fraction": 0.02, "explained_variance": 0.78, "l0": float(k),
             **(metrics or {})}
    ts = int(time.time() * 1000)
    client.log_batch(rid, params=[Param(a, b) for a, b in params.items()],
                     metrics=[Metric(a, float(b), ts, 64) for a, b in final.items()])
    client.log_artifacts(rid, str(folder), "sae")
    client.set_terminated(rid, "FINISHED")
    return rid


def sha256_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def table_counts(url: str | None = None) -> dict[str, int]:
    from sqlalchemy import text

    from saereg.registry.catalog import db

    with db.get_engine(url).connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar()
                for t in CATALOG_TABLES}


# -- PostgreSQL databases made for tests ----------------------------------------------------------

def pg_admin_engine():
    from sqlalchemy import create_engine

    return create_engine(PG_SERVER, isolation_level="AUTOCOMMIT")


def create_pg_database(prefix: str = "saereg_test") -> str:
    """CREATE DATABASE <prefix>_<random> on the test server; returns its URL."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{secrets.token_hex(4)}"
    engine = pg_admin_engine()
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(PG_SERVER).set(database=name).render_as_string(hide_password=False)


@contextmanager
def scratch_pg_catalog(server: str, prefix: str = "saereg_bench") -> Iterator[str]:
    """A new database on ``server`` migrated to head, for a benchmark: yields its URL and drops
    it afterwards."""
    global PG_SERVER
    from saereg.registry.catalog import db, migrate

    PG_SERVER = server
    url = create_pg_database(prefix)
    try:
        migrate.upgrade_engine(db.get_engine(url, check_schema=False), "head")
        yield url
    finally:
        drop_pg_database(url)


def drop_pg_database(url: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from saereg.registry.catalog import db

    db.dispose_all()
    engine = pg_admin_engine()
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    engine.dispose()


def migrated_pg_database(prefix: str = "saereg_test"):
    """For a session fixture: a PostgreSQL database made for the session and migrated to head;
    yields its URL and drops it afterwards."""
    from saereg.registry.catalog import db, migrate

    url = create_pg_database(prefix)
    try:
        migrate.upgrade_engine(db.get_engine(url, check_schema=False), "head")
        yield url
    finally:
        drop_pg_database(url)


# -- the catalog backend of a test ----------------------------------------------------------------

BACKENDS = ["sqlite", pytest.param("postgresql", marks=[
    pytest.mark.postgres,
    pytest.mark.skipif(not PG_SERVER, reason="SAEREG_TEST_POSTGRES_URL is not set")])]
"""The ``params`` of a backend fixture: SQLite always, PostgreSQL when the server is set."""


def use_backend(request, monkeypatch, pg_url_fixture: str):
    """For a fixture parametrised with :data:`BACKENDS`: point the catalog at the backend of
    this test, "sqlite" (a fresh file in SAEREG_HOME) or "postgresql" (the session database
    that the fixture ``pg_url_fixture`` gives, emptied), yield its name, then close every
    engine."""
    from saereg.registry.catalog import db

    monkeypatch.delenv("SAEREG_DATABASE_URL", raising=False)
    if request.param == "postgresql":
        from sqlalchemy import text

        url = request.getfixturevalue(pg_url_fixture)
        monkeypatch.setenv("SAEREG_DATABASE_URL", url)
        with db.get_engine(url).begin() as conn:
            conn.execute(text(f"TRUNCATE {', '.join(CATALOG_TABLES)} RESTART IDENTITY CASCADE"))
    yield request.param
    db.dispose_all()


def error_line(result, code: int | None = None, *, alone: bool = True) -> str:
    """The one ``Error:`` line of a failed CLI call (click's CliRunner result): it exited
    through click (no uncaught exception, no traceback), with ``code`` when given; with
    ``alone``, a call that exited 1 printed nothing else."""
    if code is not None:
        assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught error
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    if alone and result.exit_code == 1:
        assert result.output.strip() == errors[0], result.output
    return errors[0]


def catalog_state(store, mlflow_client) -> tuple:
    """Row counts, stored blobs and MLflow model versions: what a refused input must not
    change (``store``: the catalog's ArtifactStore)."""
    blobs = sorted(sha for sha, _ in store.iter_blobs())
    versions = sorted((v.name, v.version) for v in mlflow_client.search_model_versions())
    return table_counts(), blobs, versions
