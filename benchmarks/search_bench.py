"""Word search over a large label catalog, common words included.

A scratch catalog of N labels (default 1,000,000) shaped like the heuristic labeller's
("fires on 'a', 'b', 'c', 'd'; promotes 'e', 'f', 'g', 'h'", tokens drawn from a 20,000-word
vocabulary, so "fires" and "promotes" are in every heuristic label and a token word in ~400),
plus hand-written labels on 5% of the features (a third of them about fires), an older
superseded label on 2% and a rejected label on 1%, spread over SAEs of 50,000 features on two
models and six hooks, each SAE with a stats run (firing rates log-uniform in 1e-5..1e-1).
The catalog is filled once with bulk inserts and reused by later runs (``--fresh`` refills).

Then ``search_labels`` (limit 20) for each query kind, p50 / p95 over the timed calls after
5 warm-up calls: a word in every heuristic label ("fires"), the same with filters (SAE, firing
rate), two common words, a common word with a rare one, and a rare word alone.
Target: p95 < 20 ms for each kind at 1,000,000 labels.

    python benchmarks/search_bench.py --rows 1000000 [--queries 200] [--db PATH]
        [--postgres postgresql+psycopg://postgres@127.0.0.1:5432/test] [--skip-sqlite]
        [--only "forest"]   # only the query kinds whose name holds the text
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

SAE_FEATURES = 50_000
VOCAB = 20_000
TRIGGER = ("CREATE TRIGGER feature_labels_ai AFTER INSERT ON feature_labels BEGIN "
           "INSERT INTO feature_labels_fts(rowid, text) VALUES (new.id, new.text); END")
"""The migration's trigger (0004_feature_catalog), dropped while the rows go in."""
TOPICS = ["forest", "fires", "wildfire", "smoke", "flames", "burning", "camp", "alarm",
          "negation", "quotes", "python", "code", "legal", "french", "numbers", "dates"]


def vocabulary() -> list[str]:
    rng = random.Random(0)
    return [f"w{i}{''.join(rng.choices('abcdefghij', k=3))}" for i in range(VOCAB)]


def label_rows(rows: int):
    """(version_id, feature_index, text, method, status) rows; version ids from 1."""
    rng = random.Random(0)
    vocab = vocabulary()
    for n in range(rows):
        vid, idx = n // SAE_FEATURES + 1, n % SAE_FEATURES
        if rng.random() < 0.02:  # an older label, superseded below
            yield vid, idx, "mentions of " + " ".join(rng.choices(vocab, k=3)), "llm", "candidate"
        if rng.random() < 0.01:
            yield vid, idx, "fires on rejected " + rng.choice(vocab), "human", "rejected"
        toks = rng.choices(vocab, k=8)
        yield (vid, idx, "fires on " + ", ".join(f"'{t}'" for t in toks[:4]) + "; promotes "
               + ", ".join(f"'{t}'" for t in toks[4:]), "heuristic", "candidate")
        if rng.random() < 0.05:
            words = rng.sample(TOPICS, k=rng.randint(1, 4)) + rng.choices(vocab, k=1)
            yield vid, idx, " ".join(words), "human", "accepted"


def fill(url: str, rows: int) -> None:
    from sqlalchemy import text

    from saereg.registry.catalog import db
    from saereg.registry.catalog.writes import Catalog

    if url.startswith("sqlite"):
        Catalog(url)  # migrates SQLite
    eng = db.get_engine(url)
    n_saes = (rows + SAE_FEATURES - 1) // SAE_FEATURES
    rng = random.Random(2)
    pg = url.startswith("postgresql")
    with eng.begin() as conn:
        conn.execute(text("INSERT INTO language_models (id, name, created_at) VALUES "
                          "(1, 'bench-lm-a', CURRENT_TIMESTAMP), (2, 'bench-lm-b', "
                          "CURRENT_TIMESTAMP)"))
        for i in range(1, n_saes + 1):
            conn.execute(text(
                "INSERT INTO saes (id, name, model_id, hook, architecture, d_in, d_sae, "
                "created_at, created_by) VALUES (:i, :name, :m, :hook, 'topk', 8, :d, "
                "CURRENT_TIMESTAMP, 'b')"),
                {"i": i, "name": f"bench-{i}", "m": 1 + i % 2, "hook": f"model.layers.{i % 6}",
                 "d": SAE_FEATURES})
            conn.execute(text(
                "INSERT INTO sae_versions (id, sae_id, number, uid, status, config, params, "
                "metrics, artifact_uri, source_kind, source_uri, created_at, created_by) VALUES "
                "(:i, :i, 1, :uid, 'ready', '{}', '{}', '{}', 'x', 'folder', 'x', "
                "CURRENT_TIMESTAMP, 'b')"), {"i": i, "uid": f"u{i}"})
            conn.execute(text(
                "INSERT INTO stats_runs (id, version_id, dataset, tokens, context_size, "
                "code_version, params, created_at, created_by) VALUES (:i, :i, 'd', 1, 1, 'c', "
                "'{}', CURRENT_TIMESTAMP, 'b')"), {"i": i})
        if pg:
            conn.execute(text("DROP INDEX IF EXISTS ix_feature_labels_text_tsv"))
    raw = eng.raw_connection()
    try:
        cur = raw.cursor()
        feats = [(n // SAE_FEATURES + 1, n % SAE_FEATURES) for n in range(rows)]
        stats = [(v, i, 10 ** rng.uniform(-5, -1)) for v, i in feats]
        labs = list(label_rows(rows))
        if pg:
            with cur.copy("COPY features (version_id, feature_index) FROM STDIN") as cp:
                for r in feats:
                    cp.write_row(r)
            with cur.copy("COPY feature_stats (stats_run_id, feature_index, firing_rate, "
                          "mean_activation, max_activation, histogram, top_examples, "
                          "interval_examples, top_logits, bottom_logits) FROM STDIN") as cp:
                for v, i, r in stats:
                    cp.write_row((v, i, r, 1.0, 1.0, "{}", "[]", "[]", "[]", "[]"))
            with cur.copy("COPY feature_labels (version_id, feature_index, text, method, "
                          "status, created_at, created_by) FROM STDIN") as cp:
                for r in labs:
                    cp.write_row((*r, "2026-01-01T00:00:00Z", "b"))
        else:  # the full-text index is built once after the rows, not row by row
            cur.execute("PRAGMA synchronous = OFF")
            cur.execute("DROP TRIGGER feature_labels_ai")
            cur.executemany("INSERT INTO features (version_id, feature_index) VALUES (?, ?)",
                            feats)
            cur.executemany("INSERT INTO feature_stats (stats_run_id, feature_index, firing_rate,"
                            " mean_activation, max_activation, histogram, top_examples, "
                            "interval_examples, top_logits, bottom_logits) VALUES "
                            "(?, ?, ?, 1, 1, '{}', '[]', '[]', '[]', '[]')", stats)
            cur.executemany("INSERT INTO feature_labels (version_id, feature_index, text, method,"
                            " status, created_at, created_by) VALUES (?, ?, ?, ?, ?, "
                            "CURRENT_TIMESTAMP, 'b')", labs)
            cur.execute("INSERT INTO feature_labels_fts(feature_labels_fts) VALUES ('rebuild')")
            cur.execute(TRIGGER)
        raw.commit()
    finally:
        raw.close()
    with eng.connect() as conn:
        if pg:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            from saereg.analysis.search import PG_DOCUMENT

            conn.execute(text("CREATE INDEX ix_feature_labels_text_tsv ON feature_labels "
                              f"USING gin ({PG_DOCUMENT.format(col='text')})"))
            conn.execute(text("VACUUM ANALYZE"))
        else:
            conn.execute(text("ANALYZE"))
            conn.commit()


def label_count(url: str) -> int | None:
    from sqlalchemy import text

    from saereg.registry.catalog import db

    try:
        with db.get_engine(url, check_schema=False).connect() as conn:
            return conn.execute(text("SELECT count(*) FROM features")).scalar()
    except Exception:  # noqa: BLE001 - no catalog yet
        return None


def queries(rng: random.Random, vocab: list[str], n_saes: int) -> dict[str, list[dict]]:
    def sae() -> str:
        return f"bench-{rng.randint(1, n_saes)}"

    return {
        '"fires"': [{"query": "fires"} for _ in range(3)],
        '"fires", --sae S': [{"query": "fires", "sae": sae()} for _ in range(40)],
        '"fires", --min-rate 0.05': [{"query": "fires", "min_rate": 0.05}],
        '"fires", --max-rate 1e-4 --model M --hook H': [
            {"query": "fires", "max_rate": 1e-4, "model": "bench-lm-b",
             "hook": f"model.layers.{rng.choice([1, 3, 5])}"} for _ in range(3)],
        '"fires promotes"': [{"query": "fires promotes"}],
        '"forest fires"': [{"query": "forest fires"}],
        '"fires" + a rare word': [{"query": f"fires {rng.choice(vocab)}"} for _ in range(50)],
        "a rare word": [{"query": rng.choice(vocab)} for _ in range(50)],
    }


def bench(url: str, name: str, n: int, rows: int, only: list[str] | None = None) -> None:
    from saereg.analysis.search import search_labels

    rng = random.Random(1)
    n_saes = (rows + SAE_FEATURES - 1) // SAE_FEATURES
    for kind, pool in queries(rng, vocabulary(), n_saes).items():
        if only and not any(o in kind for o in only):
            continue
        times, hits = [], 0
        for i in range(n + 5):
            t = time.perf_counter()
            got = search_labels(**pool[i % len(pool)], database_url=url)
            if i >= 5:
                times.append(time.perf_counter() - t)
                hits += len(got)
        times.sort()
        print(f"{name} {rows:,} features: {kind}: p50 {times[len(times) // 2] * 1e3:.2f} ms, "
              f"p95 {times[int(len(times) * 0.95)] * 1e3:.2f} ms "
              f"({hits / n:.1f} hits/query, load {os.getloadavg()[0]:.1f})", flush=True)


def prepare(url: str, rows: int, fresh: bool, name: str) -> None:
    if not fresh and label_count(url) == rows:
        return
    t0 = time.perf_counter()
    fill(url, rows)
    print(f"{name}: filled {rows:,} features in {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="features (one heuristic label "
                   "each, plus the extra labels described above)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--db", default=None, help="SQLite file kept between runs (default: "
                   "/tmp/saereg-search-bench/catalog-ROWS.db)")
    p.add_argument("--postgres", default=None, help="server URL; a database "
                   "saereg_search_bench_ROWS is made there and kept between runs")
    p.add_argument("--fresh", action="store_true", help="refill the catalogs")
    p.add_argument("--skip-sqlite", action="store_true")
    p.add_argument("--only", action="append", default=None, metavar="TEXT",
                   help="time only the query kinds whose name contains TEXT (repeatable)")
    args = p.parse_args()
    if not args.skip_sqlite:
        path = Path(args.db or f"/tmp/saereg-search-bench/catalog-{args.rows}.db")
        path.parent.mkdir(parents=True, exist_ok=True)
        if args.fresh and path.exists():
            path.unlink()
        if label_count(f"sqlite:///{path}") not in (None, args.rows):
            path.unlink()
        url = f"sqlite:///{path}"
        prepare(url, args.rows, False, "SQLite")
        bench(url, "SQLite", args.queries, args.rows, args.only)
    if args.postgres:
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        from saereg.registry.catalog import db, migrate

        name = f"saereg_search_bench_{args.rows}"
        admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                  {"n": name}).scalar()
            if exists and args.fresh:
                conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
                exists = None
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = make_url(args.postgres).set(database=name).render_as_string(hide_password=False)
        migrate.upgrade_engine(db.get_engine(url, check_schema=False), "head")
        prepare(url, args.rows, bool(exists) and label_count(url) != args.rows, "PostgreSQL")
        bench(url, "PostgreSQL", args.queries, args.rows, args.only)


if __name__ == "__main__":
    main()
