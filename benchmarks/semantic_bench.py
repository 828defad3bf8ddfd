"""Search by meaning: embedding throughput and search latency.

1. ``embed``: labels embedded per second on the CPU by the packaged all-MiniLM-L6-v2
   (``saereg.analysis.embed.embed``, batches of 64, texts shaped like heuristic and human
   labels), after one warm-up batch; the model's load time is printed apart.
2. ``search``: a scratch catalog filled with direct inserts: ROWS labelled features over SAE
   versions of 16,384 features each (one model, one hook), one label each, each label with an
   embedding that is a random unit vector (float32; random vectors time the search exactly as
   real ones do, they only make the hits meaningless). Then ``search_meaning`` for random
   two-word queries (the query's embedding included), p50 / p95 over the timed calls, after
   the first call that builds the in-process index (its time printed apart), and the same for
   one SAE (``--sae``) and for every SAE of the model grouped by version. Target: p95 < 50 ms
   at 100,000. ``--postgres URL`` does the same on a scratch database on that server.

    python benchmarks/semantic_bench.py embed [--labels 2000] [--threads N]
    python benchmarks/semantic_bench.py search --rows 100000 1000000 [--postgres URL]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time

PER_VERSION = 16_384
WORDS = ("time travel cooking river music code parentheses money train sky colour space war "
         "love law medicine football weather number letter city animal plant fire water "
         "computer language history king queen ocean mountain night morning bread").split()


def bench_embed(n: int, threads: int | None) -> None:
    import torch

    from saereg.analysis.embed import embed, embedder

    if threads:
        torch.set_num_threads(threads)
    t = time.perf_counter()
    embedder()
    print(f"model load: {time.perf_counter() - t:.1f} s")
    rng = random.Random(0)
    texts = []
    for i in range(n):
        if i % 2:
            toks = ", ".join(f"'{rng.choice(WORDS)}'" for _ in range(4))
            texts.append(f"fires on {toks}; promotes {toks}")
        else:
            texts.append(" ".join(rng.choices(WORDS, k=rng.randint(3, 8))))
    embed(texts[:64])
    t = time.perf_counter()
    embed(texts)
    dt = time.perf_counter() - t
    print(f"embedded {n} labels in {dt:.1f} s: {n / dt:.0f} labels/s "
          f"(torch threads {torch.get_num_threads()})")


def fill(url: str, rows: int) -> None:
    import numpy as np
    from sqlalchemy import text

    from saereg.analysis.embed import EMBED_DIM, EMBED_MODEL
    from saereg.registry.catalog import db
    from saereg.registry.catalog.writes import Catalog

    Catalog(url)  # migrates SQLite
    eng = db.get_engine(url)
    rng = np.random.default_rng(0)
    versions = (rows + PER_VERSION - 1) // PER_VERSION
    with eng.begin() as conn:
        conn.execute(text("INSERT INTO language_models (id, name, created_at) VALUES "
                          "(1, 'bench-lm', CURRENT_TIMESTAMP)"))
        for v in range(1, versions + 1):
            conn.execute(text(
                "INSERT INTO saes (id, name, model_id, hook, architecture, d_in, d_sae, "
                f"created_at, created_by) VALUES ({v}, 'bench-{v}', 1, 'h', 'topk', 8, "
                f"{PER_VERSION}, CURRENT_TIMESTAMP, 'b')"))
            conn.execute(text(
                "INSERT INTO sae_versions (id, sae_id, number, uid, status, config, params, "
                "metrics, artifact_uri, source_kind, source_uri, created_at, created_by) VALUES "
                f"({v}, {v}, 1, 'u{v}', 'ready', '{{}}', '{{}}', '{{}}', 'x', 'folder', 'x', "
                "CURRENT_TIMESTAMP, 'b')"))
    step = 20_000
    for lo in range(0, rows, step):
        ids = range(lo, min(rows, lo + step))
        vecs = rng.standard_normal((len(ids), EMBED_DIM), dtype=np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        with eng.begin() as conn:
            conn.execute(text("INSERT INTO features (version_id, feature_index) VALUES (:v, :i)"),
                         [{"v": 1 + i // PER_VERSION, "i": i % PER_VERSION} for i in ids])
            conn.execute(text(
                "INSERT INTO feature_labels (id, version_id, feature_index, text, method, "
                "status, created_at, created_by) VALUES (:id, :v, :i, :t, 'heuristic', "
                "'candidate', CURRENT_TIMESTAMP, 'b')"),
                [{"id": i + 1, "v": 1 + i // PER_VERSION, "i": i % PER_VERSION,
                  "t": f"label {i}"} for i in ids])
            conn.execute(text(
                "INSERT INTO label_embeddings (label_id, model, dim, vector, created_at) "
                "VALUES (:l, :m, :d, :b, CURRENT_TIMESTAMP)"),
                [{"l": i + 1, "m": EMBED_MODEL, "d": EMBED_DIM, "b": vecs[k].tobytes()}
                 for k, i in enumerate(ids)])
    if url.startswith("postgresql"):
        with eng.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("VACUUM ANALYZE"))


def timed(fn, queries: list[str]) -> tuple[float, float]:
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e3, times[int(len(times) * 0.95)] * 1e3


def bench_search(url: str, rows: int, n: int, name: str) -> None:
    from saereg.analysis import semantic
    from saereg.analysis.embed import embed

    t = time.perf_counter()
    fill(url, rows)
    print(f"{name} {rows}: filled in {time.perf_counter() - t:.0f} s")
    embed(["warm up"])
    t = time.perf_counter()
    semantic.search_meaning("first query", database_url=url)
    print(f"{name} {rows}: first query (index built) {time.perf_counter() - t:.1f} s")
    rng = random.Random(1)
    queries = [" ".join(rng.sample(WORDS, 2)) for _ in range(n)]
    e50, e95 = timed(lambda q: embed([q]), queries)
    cases = [("all SAEs, limit 20", lambda q: semantic.search_meaning(q, database_url=url)),
             ("one SAE (bench-1)",
              lambda q: semantic.search_meaning(q, sae="bench-1", database_url=url)),
             ("every SAE of the model, grouped, 5 each",
              lambda q: semantic.search_meaning_grouped(q, model="bench-lm", limit=5,
                                                        database_url=url)),
             ("hybrid, all SAEs",
              lambda q: semantic.search_meaning(q, hybrid=True, database_url=url))]
    print(f"{name} {rows}: query embedding alone p50 {e50:.2f} ms, p95 {e95:.2f} ms")
    for what, fn in cases:
        p50, p95 = timed(fn, queries)
        print(f"{name} {rows}: {what}: p50 {p50:.2f} ms, p95 {p95:.2f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("embed")
    e.add_argument("--labels", type=int, default=2000)
    e.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    s = sub.add_parser("search")
    s.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    s.add_argument("--queries", type=int, default=200)
    s.add_argument("--postgres", default=None)
    s.add_argument("--no-sqlite", action="store_true")
    args = p.parse_args()
    if args.what == "embed":
        bench_embed(args.labels, args.threads)
        return
    for rows in args.rows:
        if not args.no_sqlite:
            with tempfile.TemporaryDirectory() as tmp:
                bench_search(f"sqlite:///{tmp}/catalog.db", rows, args.queries, "SQLite")
        if args.postgres:
            sys.path.insert(0, "tests/registry")
            from catalog_helpers import scratch_pg_catalog

            with scratch_pg_catalog(args.postgres) as url:
                bench_search(url, rows, args.queries, "PostgreSQL")
        from saereg.analysis import semantic

        semantic._indexes.clear()  # free the index before the next size


if __name__ == "__main__":
    main()
