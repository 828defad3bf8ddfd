"""Catalog migrations on real SQLite files and real PostgreSQL databases: empty -> head gives
exactly the schema below (and matches the ORM); head -> base leaves nothing and base -> head
again gives the same schema; every older revision, filled with data, upgrades to head with its
data intact (key-metric columns filled from the metrics snapshot); the SQLite catalog upgrades
itself on first use; a PostgreSQL catalog is never migrated silently: every operation stops
with one error naming `saereg db upgrade`, which then works from the CLI."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy import inspect
from sqlalchemy import types as T
from sqlalchemy.dialects import postgresql

from catalog_helpers import PG_SERVER, create_pg_database, drop_pg_database

from saereg.commands.main import cli
from saereg.registry.catalog import db
from saereg.registry.catalog import migrate
from saereg.registry.catalog.writes import Catalog
from saereg.registry.errors import CatalogNotMigratedError

PG = pytest.param("postgresql", marks=pytest.mark.postgres)
FTS_TABLE, PG_FTS_INDEX = "feature_labels_fts", "ix_feature_labels_text_tsv"  # search, not ORM


@pytest.fixture(params=["sqlite", PG])
def new_url(request, tmp_path):
    """Makes fresh, empty catalog databases of one kind (SQLite files, or PostgreSQL databases
    dropped after the test)."""
    made: list[str] = []

    def make() -> str:
        if request.param == "postgresql":
            if not PG_SERVER:
                pytest.skip("SAEREG_TEST_POSTGRES_URL is not set")
            made.append(create_pg_database("saereg_mig"))
            return made[-1]
        made.append(f"sqlite:///{tmp_path / f'catalog{len(made)}.db'}")
        return made[-1]

    yield make
    db.dispose_all()
    for url in made:
        if url.startswith("postgresql"):
            drop_pg_database(url)


@pytest.fixture
def empty_url(new_url):
    return new_url()


def norm(t) -> str:
    if isinstance(t, T.JSON):
        return "json"
    if isinstance(t, T.Text):
        return "text"
    if isinstance(t, T.String):
        return f"varchar({t.length})"
    if isinstance(t, T.BigInteger):
        return "bigint"
    if isinstance(t, T.Integer):
        return "int"
    if isinstance(t, T.DateTime):
        return "datetime"
    if isinstance(t, T.Float):
        return "float"
    if isinstance(t, T.LargeBinary):
        return "bytes"
    return repr(t)


def schema(url: str) -> dict:
    """Tables (but alembic_version) with columns (type, nullability), keys, indexes, checks."""
    insp = inspect(db.get_engine(url, check_schema=False))
    out = {}
    for t in sorted(insp.get_table_names()):
        if t == "alembic_version" or t.startswith(FTS_TABLE):
            continue
        out[t] = {
            "columns": {c["name"]: norm(c["type"]) + (" null" if c["nullable"] else "")
                        for c in insp.get_columns(t)},
            "pk": tuple(insp.get_pk_constraint(t)["constrained_columns"]),
            "unique": sorted((u["name"], tuple(u["column_names"]))
                             for u in insp.get_unique_constraints(t)),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                              for i in insp.get_indexes(t) if not i.get("duplicates_constraint")
                              and i["name"] != PG_FTS_INDEX),
            "fks": sorted((tuple(f["constrained_columns"]), f["referred_table"],
                           tuple(f["referred_columns"])) for f in insp.get_foreign_keys(t)),
            "checks": sorted(c["name"] for c in insp.get_check_constraints(t)),
        }
    return out


EXPECTED_SCHEMA = {
    "alias_events": {
        "columns": {
            "id": "int", "sae_id": "int", "alias": "varchar(64)", "action": "varchar(8)",
            "version_id": "int null", "previous_version_id": "int null", "created_at": "datetime",
            "created_by": "varchar(128)",
        },
        "pk": ("id",),
        "unique": [],
        "indexes": [("ix_alias_events_sae_id_id", ("sae_id", "id"), False)],
        "fks": [
            (("previous_version_id",), "sae_versions", ("id",)),
            (("sae_id",), "saes", ("id",)),
            (("version_id",), "sae_versions", ("id",)),
        ],
        "checks": ["ck_alias_events_action"],
    },
    "aliases": {
        "columns": {
            "sae_id": "int", "name": "varchar(64)", "version_id": "int", "updated_at": "datetime",
            "updated_by": "varchar(128)",
        },
        "pk": ("sae_id", "name"),
        "unique": [],
        "indexes": [("ix_aliases_version_id", ("version_id",), False)],
        "fks": [(("sae_id",), "saes", ("id",)), (("version_id",), "sae_versions", ("id",))],
        "checks": [],
    },
    "catalog_meta": {
        "columns": {
            "key": "varchar(64)", "value": "text",
        },
        "pk": ("key",),
        "unique": [],
        "indexes": [],
        "fks": [],
        "checks": [],
    },
    "features": {
        "columns": {
            "version_id": "int", "feature_index": "int", "log10_firing_rate": "float null",
        },
        "pk": ("version_id", "feature_index"),
        "unique": [],
        "indexes": [],
        "fks": [(("version_id",), "sae_versions", ("id",))],
        "checks": [],
    },
    "language_models": {
        "columns": {
            "id": "int", "name": "varchar(256)", "created_at": "datetime",
        },
        "pk": ("id",),
        "unique": [("uq_language_models_name", ("name",))],
        "indexes": [],
        "fks": [],
        "checks": [],
    },
    "sae_versions": {
        "columns": {
            "id": "int", "sae_id": "int", "number": "int", "uid": "varchar(32)", "status":
            "varchar(16)", "deprecation_reason": "text null", "deprecated_at": "datetime null",
            "deprecated_by": "varchar(128) null", "config": "json", "params": "json", "metrics":
            "json", "artifact_uri": "text", "store_tree": "varchar(64) null", "source_kind":
            "varchar(16)", "source_uri": "text", "mlflow_run_id": "varchar(64) null",
            "mlflow_model_version": "varchar(32) null", "dataset": "text null", "training_tokens":
            "bigint null", "context_size": "int null", "parent_id": "int null", "created_at":
            "datetime", "created_by": "varchar(128)", "explained_variance": "float null", "l0":
            "float null", "ce_loss_score": "float null", "dead_fraction": "float null",
        },
        "pk": ("id",),
        "unique": [
            ("uq_sae_versions_sae_id_number", ("sae_id", "number")),
            ("uq_sae_versions_uid", ("uid",)),
        ],
        "indexes": [("ix_sae_versions_mlflow_run_id", ("mlflow_run_id",), False)],
        "fks": [(("parent_id",), "sae_versions", ("id",)), (("sae_id",), "saes", ("id",))],
        "checks": ["ck_sae_versions_number_positive", "ck_sae_versions_status"],
    },
    "publications": {
        "columns": {
            "id": "int", "version_id": "int", "direction": "varchar(8)", "repo": "varchar(256)",
            "path": "varchar(512)", "revision": "varchar(256)", "commit": "varchar(64)",
            "created_at": "datetime", "created_by": "varchar(128)",
        },
        "pk": ("id",),
        "unique": [("uq_publications_version_id_direction_repo_path",
                    ("version_id", "direction", "repo", "path"))],
        "indexes": [("ix_publications_repo_path", ("repo", "path"), False)],
        "fks": [(("version_id",), "sae_versions", ("id",))],
        "checks": ["ck_publications_direction"],
    },
    "saes": {
        "columns": {
            "id": "int", "name": "varchar(128)", "model_id": "int", "hook": "varchar(256)",
            "architecture": "varchar(32)", "d_in": "int", "d_sae": "int", "created_at":
            "datetime", "created_by": "varchar(128)",
        },
        "pk": ("id",),
        "unique": [("uq_saes_name", ("name",))],
        "indexes": [
            ("ix_saes_architecture", ("architecture",), False),
            ("ix_saes_model_id_hook", ("model_id", "hook"), False),
        ],
        "fks": [(("model_id",), "language_models", ("id",))],
        "checks": [],
    },
    "version_files": {
        "columns": {
            "version_id": "int", "name": "varchar(255)", "sha256": "varchar(64)", "size":
            "bigint",
        },
        "pk": ("version_id", "name"),
        "unique": [],
        "indexes": [("ix_version_files_sha256", ("sha256",), False)],
        "fks": [(("version_id",), "sae_versions", ("id",))],
        "checks": [],
    },
    "version_notes": {
        "columns": {
            "id": "int", "version_id": "int", "text": "text", "created_at": "datetime",
            "created_by": "varchar(128)",
        },
        "pk": ("id",),
        "unique": [],
        "indexes": [("ix_version_notes_version_id", ("version_id",), False)],
        "fks": [(("version_id",), "sae_versions", ("id",))],
        "checks": [],
    },
    "version_tags": {
        "columns": {
            "version_id": "int", "key": "varchar(128)", "value": "text",
        },
        "pk": ("version_id", "key"),
        "unique": [],
        "indexes": [],
        "fks": [(("version_id",), "sae_versions", ("id",))],
        "checks": [],
    },
    "stats_runs": {
        "columns": {
            "id": "int", "version_id": "int", "dataset": "text", "tokens": "bigint",
            "context_size": "int", "code_version": "varchar(64)", "params": "json",
            "created_at": "datetime", "created_by": "varchar(128)",
        },
        "pk": ("id",),
        "unique": [],
        "indexes": [("ix_stats_runs_version_id", ("version_id",), False)],
        "fks": [(("version_id",), "sae_versions", ("id",))],
        "checks": [],
    },
    "feature_stats": {
        "columns": {
            "stats_run_id": "int", "feature_index": "int", "firing_rate": "float",
            "mean_activation": "float", "max_activation": "float", "flag": "varchar(8) null",
            "histogram": "json", "top_examples": "json", "interval_examples": "json",
            "top_logits": "json", "bottom_logits": "json",
        },
        "pk": ("stats_run_id", "feature_index"),
        "unique": [],
        "indexes": [
            ("ix_feature_stats_run_flag", ("stats_run_id", "flag"), False),
            ("ix_feature_stats_run_rate",
             ("stats_run_id", "firing_rate", "feature_index", "flag", "max_activation"), False),
        ],
        "fks": [(("stats_run_id",), "stats_runs", ("id",))],
        "checks": ["ck_feature_stats_flag"],
    },
    "feature_labels": {
        "columns": {
            "id": "int", "version_id": "int", "feature_index": "int", "text": "text",
            "method": "varchar(16)", "model": "varchar(256) null", "status": "varchar(16)",
            "supersedes_id": "int null", "stats_run_id": "int null",
            "detection_score": "float null", "created_at": "datetime",
            "created_by": "varchar(128)",
        },
        "pk": ("id",),
        "unique": [],
        "indexes": [("ix_feature_labels_version_id_feature_index",
                     ("version_id", "feature_index"), False),
                    ("ix_feature_labels_version_id_id", ("version_id", "id"), False)],
        "fks": [
            (("stats_run_id",), "stats_runs", ("id",)),
            (("supersedes_id",), "feature_labels", ("id",)),
            (("version_id", "feature_index"), "features", ("version_id", "feature_index")),
        ],
        "checks": ["ck_feature_labels_method", "ck_feature_labels_status"],
    },
    "label_embeddings": {
        "columns": {
            "id": "int", "label_id": "int", "model": "varchar(128)", "dim": "int",
            "vector": "bytes", "created_at": "datetime",
        },
        "pk": ("id",),
        "unique": [("uq_label_embeddings_label_id_model", ("label_id", "model"))],
        "indexes": [],
        "fks": [(("label_id",), "feature_labels", ("id",))],
        "checks": [],
    },
    "steering_presets": {
        "columns": {
            "id": "int", "name": "varchar(128)", "number": "int", "version_id": "int",
            "method": "varchar(8)", "features": "json", "generation": "json",
            "created_at": "datetime", "created_by": "varchar(128)",
        },
        "pk": ("id",),
        "unique": [("uq_steering_presets_name_number", ("name", "number"))],
        "indexes": [("ix_steering_presets_version_id", ("version_id",), False)],
        "fks": [(("version_id",), "sae_versions", ("id",))],
        "checks": ["ck_steering_presets_method"],
    },
    "feature_neighbors": {
        "columns": {
            "version_id": "int", "feature_index": "int", "other_version_id": "int",
            "rank": "int", "other_index": "int", "cosine": "float",
        },
        "pk": ("version_id", "feature_index", "other_version_id", "rank"),
        "unique": [],
        "indexes": [],
        "fks": [(("other_version_id",), "sae_versions", ("id",)),
                (("version_id",), "sae_versions", ("id",))],
        "checks": [],
    },
    "version_evals": {
        "columns": {
            "id": "int", "version_id": "int", "dataset": "text", "tokens": "bigint",
            "context_size": "int", "metrics": "json", "mlflow_run_id": "varchar(64) null",
            "created_at": "datetime", "created_by": "varchar(128)",
        },
        "pk": ("id",),
        "unique": [],
        "indexes": [("ix_version_evals_version_id", ("version_id",), False)],
        "fks": [(("version_id",), "sae_versions", ("id",))],
        "checks": [],
    },
    "steering_runs": {
        "columns": {
            "id": "int", "preset_id": "int", "prompt": "text", "seed": "int",
            "default_text": "text", "steered_text": "text", "created_at": "datetime",
            "created_by": "varchar(128)",
        },
        "pk": ("id",),
        "unique": [],
        "indexes": [("ix_steering_runs_preset_id", ("preset_id",), False)],
        "fks": [(("preset_id",), "steering_presets", ("id",))],
        "checks": [],
    },
}


def upgrade(url: str, revision: str = "head") -> None:
    migrate.upgrade_engine(db.get_engine(url, check_schema=False), revision)


def current(url: str) -> str | None:
    return migrate.current_revision(db.get_engine(url, check_schema=False))


def test_empty_to_head_gives_the_exact_schema(empty_url):
    upgrade(empty_url)
    assert current(empty_url) == migrate.head_revision()
    assert schema(empty_url) == EXPECTED_SCHEMA
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from saereg.registry.catalog.migrate import target_metadata

    with db.get_engine(empty_url, check_schema=False).connect() as conn:
        ctx = MigrationContext.configure(conn, opts={
            "compare_type": True,
            "include_name": lambda name, _type, _parent: not (name or "").startswith(
                (FTS_TABLE, PG_FTS_INDEX))})
        assert compare_metadata(ctx, target_metadata()) == []  # the ORM and the migrations agree


def test_head_to_base_to_head(empty_url):
    upgrade(empty_url)
    migrate.downgrade_engine(db.get_engine(empty_url, check_schema=False), "base")
    assert current(empty_url) is None
    assert set(inspect(db.get_engine(empty_url, check_schema=False)).get_table_names()) <= {
        "alembic_version"}
    upgrade(empty_url)
    assert schema(empty_url) == EXPECTED_SCHEMA


# -- data written at an older revision ------------------------------------------------------------

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
V1_METRICS = {"eval/explained_variance": 0.81, "explained_variance": 0.7, "eval/l0": 32.0,
              "eval/ce_loss_score": 0.93, "final/dead_fraction": 0.01, "eval/kl_div": 0.02}
V2_METRICS = {"explained_variance": 0.66, "l0": 40.0, "dead_fraction": 0.05}


def table(name: str, *columns: str, json_columns: tuple[str, ...] = ()) -> sa.TableClause:
    return sa.table(name, *(sa.column(c) for c in columns),
                    *(sa.column(c, JSON) for c in json_columns))


def seed_0001(conn) -> None:
    """Two versions of one SAE, files, 100 features, an alias with history, a tag, a note."""
    conn.execute(sa.insert(table("language_models", "id", "name", "created_at")),
                 [{"id": 1, "name": "tiny-llama", "created_at": NOW}])
    conn.execute(sa.insert(table("saes", "id", "name", "model_id", "hook", "architecture",
                                 "d_in", "d_sae", "created_at", "created_by")),
                 [{"id": 1, "name": "seeded", "model_id": 1, "hook": "model.layers.1",
                   "architecture": "topk", "d_in": 16, "d_sae": 100, "created_at": NOW,
                   "created_by": "alice"}])
    versions = table("sae_versions", "id", "sae_id", "number", "uid", "status",
                     "artifact_uri", "source_kind", "source_uri", "mlflow_run_id",
                     "mlflow_model_version", "dataset", "training_tokens", "created_at",
                     "created_by", "parent_id",
                     json_columns=("config", "params", "metrics"))
    common = {"sae_id": 1, "status": "ready", "artifact_uri": "file:///nowhere",
              "source_kind": "folder", "source_uri": "/x", "config": {"d_in": 16, "d_sae": 100},
              "params": {"sae.k": "32"}, "dataset": "corpus", "training_tokens": 5_000_000_000,
              "created_at": NOW, "created_by": "alice", "mlflow_run_id": None}
    conn.execute(sa.insert(versions), [
        {**common, "id": 1, "number": 1, "uid": "a" * 32, "metrics": V1_METRICS,
         "mlflow_model_version": "1", "parent_id": None},
        {**common, "id": 2, "number": 2, "uid": "b" * 32, "metrics": V2_METRICS,
         "mlflow_model_version": "2", "parent_id": 1}])
    conn.execute(sa.insert(table("version_files", "version_id", "name", "sha256", "size")),
                 [{"version_id": v, "name": "cfg.json", "sha256": str(v) * 64, "size": 10}
                  for v in (1, 2)])
    conn.execute(sa.insert(table("features", "version_id", "feature_index", "log10_firing_rate")),
                 [{"version_id": 1, "feature_index": i, "log10_firing_rate": -i / 10}
                  for i in range(100)])
    conn.execute(sa.insert(table("aliases", "sae_id", "name", "version_id", "updated_at",
                                 "updated_by")),
                 [{"sae_id": 1, "name": "prod", "version_id": 1, "updated_at": NOW,
                   "updated_by": "alice"}])
    conn.execute(sa.insert(table("alias_events", "sae_id", "alias", "action", "version_id",
                                 "previous_version_id", "created_at", "created_by")),
                 [{"sae_id": 1, "alias": "prod", "action": "set", "version_id": 1,
                   "previous_version_id": None, "created_at": NOW, "created_by": "alice"}])
    conn.execute(sa.insert(table("version_tags", "version_id", "key", "value")),
                 [{"version_id": 2, "key": "sweep", "value": "s1"}])
    conn.execute(sa.insert(table("version_notes", "version_id", "text", "created_at",
                                 "created_by")),
                 [{"version_id": 1, "text": "the good one", "created_at": NOW,
                   "created_by": "alice"}])


# One seeder per revision older than head: a new migration needs a new seeder here.
def seed_0002(conn) -> None:
    """The 0001 data, with the key-metric columns filled as 0002 writes them."""
    seed_0001(conn)
    versions = table("sae_versions", "id", "explained_variance", "l0", "ce_loss_score",
                     "dead_fraction")
    conn.execute(sa.update(versions).where(versions.c.id == 1).values(
        explained_variance=0.81, l0=32.0, ce_loss_score=0.93, dead_fraction=0.01))
    conn.execute(sa.update(versions).where(versions.c.id == 2).values(
        explained_variance=0.66, l0=40.0, dead_fraction=0.05))


def seed_0003(conn) -> None:
    """The 0002 data plus one publication (0004 adds only new, empty tables)."""
    seed_0002(conn)
    conn.execute(sa.insert(table("publications", "version_id", "direction", "repo", "path",
                                 "revision", "commit", "created_at", "created_by")),
                 [{"version_id": 1, "direction": "push", "repo": "org/saes", "path": "seeded",
                   "revision": "seeded-v1", "commit": "c" * 40, "created_at": NOW,
                   "created_by": "alice"}])


def seed_0004(conn) -> None:
    """The 0003 data plus one label (0005 adds label embeddings: the label stays, unembedded)."""
    seed_0003(conn)
    conn.execute(sa.insert(table("feature_labels", "version_id", "feature_index", "text",
                                 "method", "status", "created_at", "created_by")),
                 [{"version_id": 1, "feature_index": 3, "text": "seeded label",
                   "method": "human", "status": "candidate", "created_at": NOW,
                   "created_by": "alice"}])


def seed_0005(conn) -> None:
    """The 0004 data (0006 adds only an index on feature_labels: the label stays)."""
    seed_0004(conn)


def seed_0006(conn) -> None:
    """The 0005 data (0007 adds only indexes on feature_stats)."""
    seed_0005(conn)


def seed_0007(conn) -> None:
    """The 0006 data (0008 rebuilds PostgreSQL's full-text index of the labels)."""
    seed_0006(conn)


SEEDERS = {"0001_catalog": seed_0001, "0002_key_metrics": seed_0002,
           "0003_publications": seed_0003, "0004_feature_catalog": seed_0004,
           "0005_label_embeddings": seed_0005, "0006_label_search_index": seed_0006,
           "0007_feature_stats_overview": seed_0007}


def seed_at(url: str, revision: str) -> str:
    upgrade(url, revision)
    with db.get_engine(url, check_schema=False).begin() as conn:
        SEEDERS[revision](conn)
        return conn.execute(sa.text("SELECT value FROM catalog_meta WHERE key = 'catalog_id'")
                            ).scalar_one()


def check_seeded(url: str, catalog_id: str) -> None:
    cat = Catalog(url)
    assert cat.catalog_id() == catalog_id
    v1, v2 = cat.get("seeded@prod"), cat.get("seeded@2")
    assert v1.number == 1 and v1.metrics == V1_METRICS and v1.notes[0][2] == "the good one"
    assert v1.key_metrics == {"explained_variance": 0.81, "l0": 32.0, "ce_loss_score": 0.93,
                              "dead_fraction": 0.01}
    assert v2.key_metrics == {"explained_variance": 0.66, "l0": 40.0, "ce_loss_score": None,
                              "dead_fraction": 0.05}
    assert v2.parent == "seeded@1" and v2.tags == {"sweep": "s1"}
    assert v2.training_tokens == 5_000_000_000 and v1.created_at == NOW
    assert [e.version for e in cat.alias_history("seeded")] == [1]
    with db.get_engine(url).connect() as conn:
        rates = conn.execute(sa.text("SELECT log10_firing_rate FROM features "
                                     "WHERE version_id = 1 ORDER BY feature_index")).scalars()
        assert list(rates) == pytest.approx([-i / 10 for i in range(100)])
    assert [r.explained_variance for r in cat.list()] == [0.81, 0.66]


def test_every_older_revision_with_data_upgrades_to_head(new_url):
    older = [r.revision for r in migrate.history()[:-1]]
    assert older and set(SEEDERS) == set(older)
    for revision in older:
        url = new_url()
        catalog_id = seed_at(url, revision)
        assert current(url) == revision
        upgrade(url)
        assert schema(url) == EXPECTED_SCHEMA
        check_seeded(url, catalog_id)


def test_labels_with_markup_are_found_by_their_words_after_upgrade(new_url):
    """A label about HTML tokens is found by the words inside its tags once a 0007 catalog is
    upgraded; on PostgreSQL the search's own expression is served by the rebuilt GIN index."""
    from saereg.analysis.search import _TEXT, search_labels

    url = new_url()
    seed_at(url, "0007_feature_stats_overview")
    upgrade(url)
    with db.get_engine(url).begin() as conn:
        conn.execute(sa.insert(table("feature_labels", "version_id", "feature_index", "text",
                                     "method", "status", "created_at", "created_by")),
                     [{"version_id": 1, "feature_index": 5, "method": "human",
                       "text": "fires on '<div>', '</span>' and model.layers", "status":
                       "candidate", "created_at": NOW, "created_by": "alice"}])
    for word in ("div", "span", "layers"):
        hits = search_labels(word, database_url=url)
        assert [(h.feature_index, h.label) for h in hits] == [
            (5, "fires on '<div>', '</span>' and model.layers")], word
    if url.startswith("postgresql"):
        with db.get_engine(url).connect() as conn:
            conn.exec_driver_sql("SET enable_seqscan = off")
            plan = conn.execute(sa.text("EXPLAIN " + _TEXT["postgresql"]["probe"]),
                                {"q": "div", "cap": 10}).scalars().all()
        assert any(PG_FTS_INDEX in line for line in plan), plan


def test_sqlite_catalog_upgrades_itself_on_first_use(tmp_path):
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog_id = seed_at(url, "0001_catalog")
    db.dispose_all()
    check_seeded(url, catalog_id)  # first use: migrated to head, data intact
    assert current(url) == migrate.head_revision()


@pytest.mark.postgres
def test_postgresql_is_never_migrated_silently(pg_empty_url, monkeypatch):
    monkeypatch.setenv("SAEREG_DATABASE_URL", pg_empty_url)
    with pytest.raises(CatalogNotMigratedError, match=r"is empty.*saereg db upgrade"):
        Catalog().list()
    catalog_id = seed_at(pg_empty_url, "0001_catalog")
    db.dispose_all()
    with pytest.raises(CatalogNotMigratedError,
                       match=r"is at revision 0001_catalog.*Run `saereg db upgrade`"):
        Catalog().get("seeded@1")
    assert current(pg_empty_url) == "0001_catalog"  # untouched
    result = CliRunner().invoke(cli, ["sae", "list"])
    assert result.exit_code == 1 and "saereg db upgrade" in result.output
    result = CliRunner().invoke(cli, ["db", "current"])
    assert "0001_catalog" in result.output and "run `saereg db upgrade`" in result.output
    result = CliRunner().invoke(cli, ["db", "upgrade"])
    assert result.exit_code == 0 and f"0001_catalog -> {migrate.head_revision()}" in result.output
    check_seeded(pg_empty_url, catalog_id)
    result = CliRunner().invoke(cli, ["db", "history"])
    assert "0004_feature_catalog -> 0005_label_embeddings" in result.output
    assert f"{migrate.head_revision()} (head, current)" in result.output
    result = CliRunner().invoke(cli, ["db", "downgrade", "--yes"])
    assert result.exit_code == 0 and current(pg_empty_url) == migrate.history()[-2].revision


def test_newer_schema_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    upgrade(url)
    with db.get_engine(url, check_schema=False).begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099_future'"))
    db.dispose_all()
    with pytest.raises(CatalogNotMigratedError, match="newer"):
        Catalog(url).list()
