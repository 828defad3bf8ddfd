"""Catalog speed: registering a version with 65,536 features, and listing 10,000 versions.

1. Registration: an SAE folder with d_sae = 65,536 (and a sparsity file, so every feature row
   carries its firing rate) is registered through the public API into a fresh SQLite catalog,
   MLflow mirror included (its sqlite store). The process is warmed up first (one small
   registration: imports, MLflow store, migrations), then the median of several registrations
   is reported, with the time spent in the features bulk insert.
2. Listing: the catalog is filled directly with 10,000 versions of 1,000 SAEs (metrics snapshot,
   key metrics, an alias and a tag on some), then ``Catalog.list()`` (the query behind
   ``saereg sae list``, rows built) is timed, best and median of repeated runs.

    python benchmarks/registry_bench.py [--d-in 64] [--repeats 5] [--postgres URL]

With ``--postgres`` the same two figures are also taken on a scratch database created on
that server (and dropped after).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import tempfile
import time
import uuid
from pathlib import Path

D_SAE = 65_536
N_SAES, VERSIONS_PER_SAE = 1_000, 10


def make_folder(path: Path, d_in: int, d_sae: int, seed: int) -> Path:
    import torch

    from saereg.registry.sae.folder import save_sae
    from saereg.registry.sae.modules import SAEConfig, build_sae

    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=32,
                    metadata={"model_name": "bench-lm", "hook_name": "model.layers.6"})
    rates = -torch.rand(d_sae, generator=torch.Generator().manual_seed(seed)) * 8
    return save_sae(build_sae(cfg, seed=seed), path, log_sparsity=rates, overwrite=True)


class Timed:
    """Accumulates the wall time of calls to ``module.name`` (instrumentation only)."""

    def __init__(self, module, name: str):
        self.total = 0.0
        inner = getattr(module, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - t0

        setattr(module, name, timed)


def bench_register(url: str, work: Path, d_in: int, repeats: int) -> dict[str, float]:
    from saereg.registry.catalog import writes as catalog_module
    from saereg.registry.catalog import db
    from saereg.registry.catalog.writes import Catalog

    cat = Catalog(url)
    cat.register_folder(make_folder(work / "warm", d_in, 64, seed=0), "warm-up")
    timer = Timed(catalog_module, "insert_features")
    totals, inserts = [], []
    for i in range(repeats):
        folder = make_folder(work / f"big{i}", d_in, D_SAE, seed=i + 1)
        timer.total = 0.0
        t0 = time.perf_counter()
        v = cat.register_folder(folder, "bench-65k")
        totals.append(time.perf_counter() - t0)
        inserts.append(timer.total)
        assert v.d_sae == D_SAE
    with db.session(url) as s:
        from sqlalchemy import func, select

        from saereg.registry.catalog.schema import Feature
        n = s.scalar(select(func.count()).select_from(Feature).where(Feature.version_id == v.id))
    assert n == D_SAE
    size = sum(f.size for f in v.files)
    return {"total": statistics.median(totals), "features_insert": statistics.median(inserts),
            "bytes": size}


def fill_catalog(url: str) -> None:
    """10,000 versions of 1,000 SAEs, written directly (what is timed is the listing)."""
    from sqlalchemy import insert

    from saereg.registry.catalog import db
    from saereg.registry.catalog.schema import (Alias, LanguageModel, SAERecord, SAEVersion,
                                                VersionTag, utcnow)

    now = utcnow()
    with db.session(url, write=True) as s:
        s.execute(insert(LanguageModel), [{"id": i + 1, "name": f"lm-{i}", "created_at": now}
                                          for i in range(4)])
        s.execute(insert(SAERecord), [
            {"id": i + 1, "name": f"sae-{i:04d}", "model_id": i % 4 + 1,
             "hook": f"model.layers.{i % 24}", "architecture": ("topk", "relu", "jumprelu")[i % 3],
             "d_in": 576, "d_sae": 4608 * (1 + i % 4), "created_at": now, "created_by": "bench"}
            for i in range(N_SAES)])
        rows = []
        for i in range(N_SAES):
            for n in range(1, VERSIONS_PER_SAE + 1):
                metrics = {"eval/explained_variance": 0.7 + n / 100, "eval/l0": 32.0 + n,
                           "eval/ce_loss_score": 0.9, "final/dead_fraction": 0.01,
                           **{f"step/{k}": float(k) for k in range(20)}}
                rows.append({"id": i * VERSIONS_PER_SAE + n, "sae_id": i + 1, "number": n,
                             "uid": uuid.uuid4().hex, "status": "ready", "config": {"k": 32},
                             "params": {"sae.k": "32"}, "metrics": metrics,
                             "explained_variance": 0.7 + n / 100, "l0": 32.0 + n,
                             "ce_loss_score": 0.9, "dead_fraction": 0.01,
                             "artifact_uri": "file:///bench", "source_kind": "folder",
                             "source_uri": "/bench", "mlflow_model_version": str(n),
                             "created_at": now, "created_by": "bench"})
        s.execute(insert(SAEVersion), rows)
        s.execute(insert(Alias), [{"sae_id": i + 1, "name": "prod",
                                   "version_id": i * VERSIONS_PER_SAE + 3, "updated_at": now,
                                   "updated_by": "bench"} for i in range(N_SAES)])
        s.execute(insert(VersionTag), [{"version_id": r["id"], "key": "sweep", "value": "s1"}
                                       for r in rows[::7]])


def bench_list(url: str, repeats: int) -> dict[str, float]:
    from saereg.registry.catalog.writes import Catalog

    fill_catalog(url)
    cat = Catalog(url)
    out = {}
    for label, kw in (("all", {}), ("filtered", {"model": "lm-1", "tags": {"sweep": "s1"}}),
                      ("latest", {"latest": True})):
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            rows = cat.list(**kw)
            times.append(time.perf_counter() - t0)
        times = times[1:]  # the first run warms the statement cache
        out[label] = (min(times), statistics.median(times), len(rows))
    assert out["all"][2] == N_SAES * VERSIONS_PER_SAE
    return out


def report(kind: str, reg: dict, lst: dict, d_in: int) -> None:
    print(f"\n## {kind}")
    print(f"register 1 version, d_sae {D_SAE:,} (d_in {d_in}, {reg['bytes'] / 1e6:.1f} MB of "
          f"files): {reg['total']:.2f} s median, of which features bulk insert "
          f"{reg['features_insert'] * 1000:.0f} ms")
    for label, (best, median, n) in lst.items():
        print(f"list {label:9s} ({n:>6,} rows of {N_SAES * VERSIONS_PER_SAE:,} versions): "
              f"best {best * 1000:.1f} ms, median {median * 1000:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-in", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--postgres", default=os.environ.get("SAEREG_TEST_POSTGRES_URL"),
                    help="also measure on a scratch database on this PostgreSQL server")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="saereg-bench-") as tmp:
        work = Path(tmp)
        os.environ["SAEREG_HOME"] = str(work / "home")
        os.environ.pop("SAEREG_DATABASE_URL", None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        from saereg.registry.catalog import db

        sqlite_reg = f"sqlite:///{work / 'register.db'}"
        reg = bench_register(sqlite_reg, work, args.d_in, args.repeats)
        lst = bench_list(f"sqlite:///{work / 'list.db'}", args.repeats * 4)
        report("SQLite", reg, lst, args.d_in)
        if args.postgres:
            from sqlalchemy import create_engine, text
            from sqlalchemy.engine import make_url

            from saereg.registry.catalog import migrate

            admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
            urls = []
            try:
                for _ in range(2):
                    name = f"saereg_bench_{secrets.token_hex(4)}"
                    with admin.connect() as conn:
                        conn.execute(text(f'CREATE DATABASE "{name}"'))
                    urls.append(make_url(args.postgres).set(database=name)
                                .render_as_string(hide_password=False))
                    migrate.upgrade_engine(db.get_engine(urls[-1], check_schema=False))
                reg = bench_register(urls[0], work, args.d_in, args.repeats)
                lst = bench_list(urls[1], args.repeats * 4)
                report("PostgreSQL", reg, lst, args.d_in)
            finally:
                db.dispose_all()
                with admin.connect() as conn:
                    for url in urls:
                        conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" '
                                          "WITH (FORCE)"))
                admin.dispose()


if __name__ == "__main__":
    main()
