"""Search feature labels by meaning: the query's sentence embedding against every label's
(cosine), with the filters of word search, a hybrid mode that fuses the word and meaning
ranks, and the same query over every SAE of a model grouped by SAE version.

The rules are word search's (:mod:`saereg.analysis.search`): every label a feature has had is
searched, rejected ones never; a feature is listed once, ranked by its best label, and shown
with its current label (:func:`saereg.registry.catalog.feature_schema.current_label`), naming
the label that matched when it is another one.

The index is in-process on every database (the PostgreSQL servers this was built on have no
pgvector): each process keeps the stored embeddings as one float16 matrix per SAE version
(:class:`_Index`; half the memory and time of float32, rank changes only between cosines
within ~1e-3 of each other), cosine by one matrix-vector product over the versions the filters
leave (torch on one thread, or on all of them from :data:`PARALLEL_ROWS` rows on),
``argpartition`` for the top. It is checked against the catalog on every query by one
cheap look-up (the newest embedding row and the newest label id) and grows by the new rows
only. Status and firing-rate filters are applied by the database to the top candidates, widening
the candidate set until ``limit`` features pass or none are left.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, replace

from sqlalchemy import bindparam, text

from saereg.analysis.current import current_rows_of
from saereg.analysis.embed import EMBED_DIM, EMBED_MODEL, embed, one_thread
from saereg.analysis.search import SearchHit, rate_bounds, search_labels
from saereg.registry.catalog import db
from saereg.registry.errors import SaeRegError, UsageError
from saereg.registry.models import in_clause, model_ids

MAX_QUERY_CHARS = 1000
RRF_K = 60
"""Reciprocal rank fusion: a hit at rank r in a list scores 1 / (RRF_K + r); 60 as in Cormack
et al. (2009)."""
_CHUNK = 500  # ids per IN list


PARALLEL_ROWS = 200_000
"""From this many rows searched on, the matrix-vector products use torch's threads: at
1,000,000 rows two threads took 44 ms against one's 87 (float16, idle 2-core CPU); below it,
waking the threads costs more than they save on a busy machine."""


def _threads(rows: int):
    """The thread setting for matrix-vector products over ``rows`` rows."""
    return contextlib.nullcontext() if rows >= PARALLEL_ROWS else one_thread()


@dataclass(frozen=True)
class HitGroup:
    """The hits of one SAE version, for a query over every SAE of a model."""

    ref: str
    sae: str
    version: int
    hook: str
    hits: list[SearchHit]


@dataclass
class _Block:
    label_ids: object  # numpy int64 (n,)
    indices: object    # numpy int64 (n,)
    vectors: object    # torch float16 (n, dim)


class _Index:
    def __init__(self):
        self.newest: tuple | None = None  # (id, created_at) of the newest embedding row
        self.max_label: int | None = None
        self.blocks: dict[int, _Block] = {}
        self.missing = 0


_indexes: dict[tuple, _Index] = {}
_lock = threading.Lock()


def _query(query: str) -> str:
    q = " ".join((query or "").split())
    if not q:
        raise UsageError("search by meaning needs a query, got an empty one")
    if len(q) > MAX_QUERY_CHARS:
        raise UsageError(f"a search query is at most {MAX_QUERY_CHARS} characters, got {len(q)}")
    return q


def _load(conn, idx: _Index, after: int) -> None:
    """Add the embedding rows with id > ``after`` to ``idx``, by version."""
    import numpy as np

    parts: dict[int, list] = {}
    while True:
        rows = conn.execute(text(
            "SELECT e.id, e.label_id, l.version_id, l.feature_index, e.dim, e.vector "
            "FROM label_embeddings e JOIN feature_labels l ON l.id = e.label_id "
            "WHERE e.model = :m AND e.id > :after ORDER BY e.id LIMIT 50000"),
            {"m": EMBED_MODEL, "after": after}).all()
        if not rows:
            break
        after = rows[-1][0]
        if any(r[4] != EMBED_DIM or len(r[5]) != 4 * EMBED_DIM for r in rows):
            bad = next(r[1] for r in rows if r[4] != EMBED_DIM or len(r[5]) != 4 * EMBED_DIM)
            raise SaeRegError(f"the stored embedding of label {bad} is not {EMBED_DIM} float32 "
                              "values; the catalog was written by something else")
        vids = np.fromiter((r[2] for r in rows), np.int64, len(rows))
        lids = np.fromiter((r[1] for r in rows), np.int64, len(rows))
        feats = np.fromiter((r[3] for r in rows), np.int64, len(rows))
        vecs = np.frombuffer(b"".join(bytes(r[5]) for r in rows), "<f4").reshape(-1, EMBED_DIM)
        for vid in np.unique(vids):
            sel = vids == vid
            parts.setdefault(int(vid), []).append((lids[sel], feats[sel], vecs[sel]))
    import torch

    for vid, chunks in parts.items():
        vecs = torch.from_numpy(np.concatenate([c[2] for c in chunks])).half()
        old = idx.blocks.get(vid)
        if old is not None:
            chunks.insert(0, (old.label_ids, old.indices, None))
            vecs = torch.cat([old.vectors, vecs])
        idx.blocks[vid] = _Block(np.concatenate([c[0] for c in chunks]),
                                 np.concatenate([c[1] for c in chunks]), vecs)


def index(database_url: str | None = None) -> _Index:
    """This process's index of the catalog's label embeddings, brought up to date."""
    engine = db.get_engine(database_url)
    key = (str(engine.url), os.getpid(), EMBED_MODEL)
    with _lock, engine.connect() as conn:
        newest = conn.execute(text("SELECT id, created_at FROM label_embeddings "
                                   "ORDER BY id DESC LIMIT 1")).first()
        newest = tuple(newest) if newest else None
        max_label = conn.execute(text("SELECT max(id) FROM feature_labels")).scalar()
        idx = _indexes.get(key)
        if idx is not None and (idx.newest, idx.max_label) == (newest, max_label):
            return idx
        if idx is not None and idx.newest is not None and newest is not None:
            same = conn.execute(text("SELECT created_at FROM label_embeddings WHERE id = :i"),
                                {"i": idx.newest[0]}).scalar()
            if same != idx.newest[1]:
                idx = None  # the table was emptied and refilled: start again
        if idx is None or idx.newest is None:
            idx = _Index()
        _load(conn, idx, idx.newest[0] if idx.newest else 0)
        idx.newest, idx.max_label = newest, max_label
        idx.missing = conn.execute(text(
            "SELECT count(*) FROM feature_labels l WHERE l.status <> 'rejected' AND NOT EXISTS "
            "(SELECT 1 FROM label_embeddings e WHERE e.label_id = l.id AND e.model = :m)"),
            {"m": EMBED_MODEL}).scalar()
        _indexes[key] = idx
        return idx


def unembedded(database_url: str | None = None) -> int:
    """How many searchable labels have no embedding yet (``saereg labels embed`` adds them)."""
    return index(database_url).missing


def _scope(conn, model, hook, sae) -> dict[int, tuple[str, int, str]]:
    """The versions the filters leave: id -> (SAE name, number, hook)."""
    where, params = [], {}
    for col, value in (("s.hook", hook), ("s.name", sae)):
        if value:
            where.append(f"{col} = :p{len(params)}")
            params[f"p{len(params)}"] = value
    if model:  # every recorded name of that model (saereg.registry.models)
        where.append(in_clause("s.model_id", model_ids(conn, model)))
    rows = conn.execute(text(
        "SELECT v.id, s.name, v.number, s.hook FROM sae_versions v JOIN saes s ON s.id = v.sae_id"
        + (" WHERE " + " AND ".join(where) if where else "")), params).all()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def _passing(conn, label_ids: list[int], min_rate, max_rate) -> dict[int, tuple]:
    """Of ``label_ids``, those not rejected and within the rate bounds: id -> (text, method,
    status, rate)."""
    sql = ("SELECT l.id, l.text, l.method, l.status, fs.firing_rate FROM feature_labels l "
           "LEFT JOIN feature_stats fs ON fs.feature_index = l.feature_index AND "
           "fs.stats_run_id = (SELECT max(r.id) FROM stats_runs r WHERE r.version_id = "
           "l.version_id) WHERE l.id IN :ids AND l.status <> 'rejected'")
    params: dict = {}
    if min_rate is not None:
        sql += " AND fs.firing_rate >= :min_rate"
        params["min_rate"] = min_rate
    if max_rate is not None:
        sql += " AND fs.firing_rate <= :max_rate"
        params["max_rate"] = max_rate
    stmt = text(sql).bindparams(bindparam("ids", expanding=True))
    out = {}
    for start in range(0, len(label_ids), _CHUNK):
        for r in conn.execute(stmt, {**params, "ids": label_ids[start:start + _CHUNK]}):
            out[r[0]] = tuple(r[1:])
    return out


def _top(conn, blocks: list[tuple[int, _Block]], q, limit: int, min_rate, max_rate) -> list:
    """The best ``limit`` features over ``blocks``: (cosine, label id, version id, index,
    matched text, method, status, firing rate), best first."""
    import numpy as np
    import torch

    blocks = [(vid, b) for vid, b in blocks if len(b.label_ids)]
    if not blocks:
        return []
    qh = torch.from_numpy(np.ascontiguousarray(q, np.float32)).half()
    with _threads(sum(len(b.label_ids) for _, b in blocks)):
        scores = torch.cat([b.vectors @ qh for _, b in blocks]).float().numpy()
    lids = np.concatenate([b.label_ids for _, b in blocks])
    feats = np.concatenate([b.indices for _, b in blocks])
    vids = np.concatenate([np.full(len(b.label_ids), vid, np.int64) for vid, b in blocks])
    n, k = len(scores), min(len(scores), max(4 * limit, 64))
    out, seen, checked = [], set(), set()
    while True:
        top = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
        top = top[np.lexsort((lids[top], -scores[top]))]  # best first, ties by label id
        new = [int(j) for j in top if int(lids[j]) not in checked]
        ok = _passing(conn, [int(lids[j]) for j in new], min_rate, max_rate)
        checked.update(int(lids[j]) for j in new)
        for j in new:
            key = (int(vids[j]), int(feats[j]))
            if int(lids[j]) in ok and key not in seen:
                seen.add(key)
                out.append((float(scores[j]), int(lids[j]), *key, *ok[int(lids[j])]))
                if len(out) == limit:
                    return out
        if k >= n:
            return out
        k = min(n, k * 4)


def _top_each(conn, blocks: list[tuple[int, _Block]], q, limit: int, min_rate,
              max_rate) -> dict[int, list]:
    """:func:`_top` of each block, with the candidates of every block checked by the database
    together (a version whose first candidates fall short is widened on its own)."""
    import numpy as np
    import torch

    qh = torch.from_numpy(np.ascontiguousarray(q, np.float32)).half()
    cands = {}
    with _threads(sum(len(b.label_ids) for _, b in blocks)):
        for vid, b in blocks:
            scores = (b.vectors @ qh).float().numpy()
            k = min(len(scores), max(4 * limit, 64))
            top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(k)
            cands[vid] = (top[np.lexsort((b.label_ids[top], -scores[top]))], scores)
    ok = _passing(conn, [int(lid) for vid, b in blocks for lid in b.label_ids[cands[vid][0]]],
                  min_rate, max_rate)
    out = {}
    for vid, b in blocks:
        top, scores = cands[vid]
        found, seen = [], set()
        for j in top:
            lid, i = int(b.label_ids[j]), int(b.indices[j])
            if lid in ok and i not in seen:
                seen.add(i)
                found.append((float(scores[j]), lid, vid, i, *ok[lid]))
                if len(found) == limit:
                    break
        if len(found) < limit and len(top) < len(scores):
            found = _top(conn, [(vid, b)], q, limit, min_rate, max_rate)
        out[vid] = found
    return out


def _hits(conn, found: list, versions: dict) -> list[SearchHit]:
    wanted: dict[int, set[int]] = {}
    for f in found:
        wanted.setdefault(f[2], set()).add(f[3])
    current = current_rows_of(wanted, None, conn)
    hits = []
    for score, lid, vid, i, matched, method, status, rate in found:
        cur = current.get((vid, i))  # None only if rejected since: keep the match
        name, number, _ = versions[vid]
        label, method, status = (matched, method, status) if cur is None else (
            cur.text, cur.method, cur.status)
        hits.append(SearchHit(f"{name}@{number}", i, label, method, status, rate, score,
                              matched=None if cur is not None and cur.id == lid else matched))
    return hits


def _fuse(ranked: list[list[SearchHit]], limit: int) -> list[SearchHit]:
    """Reciprocal rank fusion of ``ranked`` lists; a hit keeps its first list's fields."""
    score: dict[tuple, float] = {}
    first: dict[tuple, SearchHit] = {}
    for hits in ranked:
        for r, h in enumerate(hits, 1):
            key = (h.ref, h.feature_index)
            score[key] = score.get(key, 0.0) + 1.0 / (RRF_K + r)
            first.setdefault(key, h)
    order = sorted(score, key=lambda key: -score[key])[:limit]
    return [replace(first[key], rank=score[key]) for key in order]


def _start(query, limit, min_rate, max_rate, hybrid, database_url):
    """The checked query and filters, the query's embedding, the index and the candidate pool
    (wider with ``hybrid``, whose fusion needs more than ``limit`` of each ranking)."""
    q = _query(query)
    if limit < 1:
        raise UsageError(f"limit must be positive, got {limit}")
    min_rate, max_rate = rate_bounds(min_rate, max_rate)
    return (q, min_rate, max_rate, embed([q])[0], index(database_url),
            max(3 * limit, 50) if hybrid else limit)


def search_meaning(query: str, *, model: str | None = None, hook: str | None = None,
                   sae: str | None = None, min_rate: float | None = None,
                   max_rate: float | None = None, limit: int = 20, hybrid: bool = False,
                   database_url: str | None = None) -> list[SearchHit]:
    """Features whose labels mean ``query``, best first (``rank``: the cosine; with
    ``hybrid``, the fused score of this ranking and word search's)."""
    q, min_rate, max_rate, vec, idx, pool = _start(query, limit, min_rate, max_rate, hybrid,
                                                   database_url)
    with db.get_engine(database_url).connect() as conn:
        versions = _scope(conn, model, hook, sae)
        blocks = [(vid, idx.blocks[vid]) for vid in versions if vid in idx.blocks]
        hits = _hits(conn, _top(conn, blocks, vec, pool, min_rate, max_rate), versions)
    if not hybrid:
        return hits
    words = search_labels(q, model=model, hook=hook, sae=sae, min_rate=min_rate,
                          max_rate=max_rate, limit=pool, database_url=database_url)
    return _fuse([hits, words], limit)


def search_meaning_grouped(query: str, *, model: str, hook: str | None = None,
                           min_rate: float | None = None, max_rate: float | None = None,
                           limit: int = 5, hybrid: bool = False,
                           database_url: str | None = None) -> list[HitGroup]:
    """The same query over every SAE version of ``model``: the best ``limit`` features of each
    version, groups ordered by their best hit."""
    if not model:
        raise UsageError("a search across SAEs needs the model (--model)")
    q, min_rate, max_rate, vec, idx, pool = _start(query, limit, min_rate, max_rate, hybrid,
                                                   database_url)
    groups = []
    with db.get_engine(database_url).connect() as conn:
        versions = _scope(conn, model, hook, None)
        blocks = [(vid, idx.blocks[vid]) for vid in sorted(versions, key=versions.get)
                  if vid in idx.blocks]
        found = _top_each(conn, blocks, vec, pool, min_rate, max_rate)
        hits = _hits(conn, [f for vid, _ in blocks for f in found[vid]], versions)
        for vid, _ in blocks:
            name, number, vhook = versions[vid]
            ref = f"{name}@{number}"
            groups.append(HitGroup(ref, name, number, vhook, [h for h in hits if h.ref == ref]))
    if hybrid:
        words = search_labels(q, model=model, hook=hook, min_rate=min_rate, max_rate=max_rate,
                              limit=min(1000, pool * max(1, len(groups))),
                              database_url=database_url)
        groups = [replace(g, hits=_fuse([g.hits, [w for w in words if w.ref == g.ref]], limit))
                  for g in groups]
    groups = [g for g in groups if g.hits]
    return sorted(groups, key=lambda g: -g.hits[0].rank)
