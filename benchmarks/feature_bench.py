"""Feature catalog speed.

1. ``analyze``: the analyze pass (forward stopped at the hook, SAE encode, every statistic,
   running top-k) against a bare full forward of the model over the same batches (the same
   tokens, logits included), alternating per batch, median per batch. Target: at most 1.3x.
2. ``search``: label search over N feature-label rows (default 1,000,000) in a scratch catalog
   filled with direct inserts (one version with N features, one label each: 6 words drawn from
   a 20,000-word vocabulary), then ``search_labels`` for random one- and two-word queries,
   p50 / p95 of the timed queries. Target: p95 < 20 ms. ``--postgres URL`` does the same on a
   scratch database created on that server (and dropped after). Words in most labels (such
   as "fires" in every heuristic label) and filters: ``benchmarks/search_bench.py``.

    python benchmarks/feature_bench.py analyze [--model smollm2-135m] [--hook model.layers.6]
    python benchmarks/feature_bench.py search [--rows 1000000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time


def bench_analyze(args) -> None:
    import torch

    from saereg.analysis.stats import AnalyzeConfig, FeatureAccumulator
    from saereg.registry.sae.modules import SAEConfig, build_sae
    from saereg.training.data import TokenWindows
    from saereg.training.lm import ActivationCapture, load_lm, special_token_mask

    torch.manual_seed(0)
    lm = load_lm(args.model)
    sae = build_sae(SAEConfig(d_in=lm.d_model, d_sae=args.d_sae, architecture="topk", k=32))
    cap = ActivationCapture(lm, [args.hook])
    acc = FeatureAccumulator(args.d_sae, AnalyzeConfig(context_size=args.context))
    bare, study = [], []
    batches = TokenWindows(lm.tokenizer, args.context).batches(args.batch)
    for n, (ids, _) in enumerate(batches):
        if n > args.batches:
            break
        t0 = time.perf_counter()
        with torch.no_grad():
            lm.model(ids, use_cache=False)
        t1 = time.perf_counter()
        with torch.no_grad():
            acts = sae.encode(cap(ids)[args.hook])
            acc.update(acts, ids, ~special_token_mask(lm.tokenizer, ids))
        t2 = time.perf_counter()
        if n:  # the first batch warms up
            bare.append(t1 - t0)
            study.append(t2 - t1)
    b, s = statistics.median(bare), statistics.median(study)
    tok = args.batch * args.context
    print(f"{args.model} {args.hook} d_sae {args.d_sae}: bare forward {tok / b:.0f} tok/s, "
          f"analyze {tok / s:.0f} tok/s, analyze/bare = {s / b:.2f}x")


def fill(url: str, rows: int) -> list[str]:
    from sqlalchemy import text

    from saereg.registry.catalog import db
    from saereg.registry.catalog.writes import Catalog

    rng = random.Random(0)
    vocab = [f"w{i}{''.join(rng.choices('abcdefghij', k=3))}" for i in range(20_000)]
    Catalog(url)  # migrates SQLite
    eng = db.get_engine(url)
    with eng.begin() as conn:
        conn.execute(text("INSERT INTO language_models (id, name, created_at) VALUES "
                          "(1, 'bench-lm', CURRENT_TIMESTAMP)"))
        conn.execute(text("INSERT INTO saes (id, name, model_id, hook, architecture, d_in, d_sae,"
                          " created_at, created_by) VALUES (1, 'bench', 1, 'h', 'topk', 8, "
                          f"{rows}, CURRENT_TIMESTAMP, 'b')"))
        conn.execute(text("INSERT INTO sae_versions (id, sae_id, number, uid, status, config, "
                          "params, metrics, artifact_uri, source_kind, source_uri, created_at, "
                          "created_by) VALUES (1, 1, 1, 'u1', 'ready', '{}', '{}', '{}', 'x', "
                          "'folder', 'x', CURRENT_TIMESTAMP, 'b')"))
        step = 50_000
        for lo in range(0, rows, step):
            conn.execute(text("INSERT INTO features (version_id, feature_index) VALUES (1, :i)"),
                         [{"i": i} for i in range(lo, min(rows, lo + step))])
            conn.execute(text(
                "INSERT INTO feature_labels (version_id, feature_index, text, method, status, "
                "created_at, created_by) VALUES (1, :i, :t, 'heuristic', 'candidate', "
                "CURRENT_TIMESTAMP, 'b')"),
                [{"i": i, "t": " ".join(rng.choices(vocab, k=6))}
                 for i in range(lo, min(rows, lo + step))])
    if url.startswith("postgresql"):
        with eng.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("VACUUM ANALYZE feature_labels"))
    return vocab


def bench_search(url: str, rows: int, queries: int, name: str) -> None:
    from saereg.analysis.search import search_labels

    t0 = time.perf_counter()
    vocab = fill(url, rows)
    print(f"{name}: filled {rows} labels in {time.perf_counter() - t0:.0f} s")
    rng = random.Random(1)
    for words in (1, 2):
        times, hits = [], 0
        for n in range(queries + 5):
            q = " ".join(rng.choices(vocab, k=words))
            t = time.perf_counter()
            got = search_labels(q, database_url=url)
            if n >= 5:
                times.append(time.perf_counter() - t)
                hits += len(got)
        times.sort()
        print(f"{name}: {words}-word queries over {rows} rows: p50 "
              f"{times[len(times) // 2] * 1e3:.2f} ms, p95 "
              f"{times[int(len(times) * 0.95)] * 1e3:.2f} ms ({hits / queries:.1f} hits/query)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("analyze")
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--hook", default="model.layers.6")
    a.add_argument("--d-sae", type=int, default=4608)
    a.add_argument("--context", type=int, default=128)
    a.add_argument("--batch", type=int, default=8)
    a.add_argument("--batches", type=int, default=6)
    s = sub.add_parser("search")
    s.add_argument("--rows", type=int, default=1_000_000)
    s.add_argument("--queries", type=int, default=200)
    s.add_argument("--postgres", default=None)
    args = p.parse_args()
    if args.what == "analyze":
        bench_analyze(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        bench_search(f"sqlite:///{tmp}/catalog.db", args.rows, args.queries, "SQLite")
    if args.postgres:
        import sys

        sys.path.insert(0, "tests/registry")
        from catalog_helpers import scratch_pg_catalog

        with scratch_pg_catalog(args.postgres) as url:
            bench_search(url, args.rows, args.queries, "PostgreSQL")


if __name__ == "__main__":
    main()
