"""Search over feature labels (SQLite FTS5 with bm25, PostgreSQL full text with ts_rank), the
features that fire on a prompt, and nearest features by decoder cosine.

Search matches every word of the query (stemmed) against every label a feature has had;
rejected labels never match. A feature is listed once, ranked by its best-matching label, and
shown with its current label (the one ``saereg feature show`` shows; the rule is
:func:`saereg.registry.catalog.feature_schema.current_label`); when the match came from another
label, such as one the current label superseded, the hit says which. Filters: model, hook, SAE
name, firing-rate range (from the version's latest stats run; each bound a finite number in
0..1, the lowest not above the highest).

The cost of a search is bounded whatever the words: each word's document frequency is probed
up to :data:`RANKED_DF` labels; the rare words (at most that many labels each) are ranked, the
common ones only filter; a query of common words only (a word every heuristic label holds,
such as "fires") reads its matches newest first through the filters and stops at ``limit``
features, instead of ranking every label in the catalog. On PostgreSQL, common words seldom
found in one label ("forest fires") fetch their matches through the full-text index instead
of reading labels newest first (see :func:`_use_index`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from sqlalchemy import text

from saereg.analysis.current import current_rows_of
from saereg.registry.catalog import db
from saereg.registry.errors import ConfigError, UsageError
from saereg.registry.models import in_clause, model_ids
from saereg.registry.sae.checks import finite_number


@dataclass(frozen=True)
class SearchHit:
    """A feature that matched: ``label``, ``method`` and ``status`` are those of its current
    label; ``matched`` is the text of the label that matched the query when that is another
    one (None when the current label itself matched)."""

    ref: str
    feature_index: int
    label: str
    method: str
    status: str
    firing_rate: float | None
    rank: float
    matched: str | None = None


RANKED_DF = 1000
"""A query word found in more labels than this is a *common* word: it still has to match, but
it adds nothing to a hit's rank (its inverse document frequency is low; FTS5's bm25 already
gives a word in more than half the labels almost no weight). Ranking a rare word costs at most
this many labels; a query of common words only lists its hits newest label first, read in
index order and stopped as soon as ``limit`` features passed the filters, so its cost does not
grow with the catalog (on PostgreSQL, words seldom together are fetched through the full-text
index, at most as many labels as the rarest of them is in)."""


def _words(query: str) -> list[str]:
    words = re.findall(r"\w+", query or "", flags=re.UNICODE)
    if not words:
        raise UsageError(f"search needs at least one word, got {query!r}")
    return words[:16]


def rate_bounds(min_rate, max_rate) -> tuple[float | None, float | None]:
    """The firing-rate filter of a search, checked: finite, within [0, 1], min <= max."""
    if min_rate is not None:
        min_rate = finite_number(min_rate, "min_rate", minimum=0, maximum=1)
    if max_rate is not None:
        max_rate = finite_number(max_rate, "max_rate", minimum=0, maximum=1)
    if min_rate is not None and max_rate is not None and min_rate > max_rate:
        raise ConfigError(f"min_rate {min_rate:g} is above max_rate {max_rate:g}: no firing "
                          "rate lies between them", field="min_rate")
    return min_rate, max_rate


def search_labels(query: str, *, model: str | None = None, hook: str | None = None,
                  sae: str | None = None, min_rate: float | None = None,
                  max_rate: float | None = None, limit: int = 20,
                  database_url: str | None = None) -> list[SearchHit]:
    """Features with a label that contains every word of ``query``, best first, each shown
    with its current label.

    Rank: bm25 (SQLite) or ts_rank (PostgreSQL) over the query's rare words, the common ones
    (see :data:`RANKED_DF`) only filtering; ties and common-word-only queries newest label
    first."""
    words = _words(query)
    if limit < 1:
        raise UsageError(f"limit must be positive, got {limit}")
    min_rate, max_rate = rate_bounds(min_rate, max_rate)
    engine = db.get_engine(database_url)
    if engine.dialect.name not in _TEXT:
        raise UsageError(f"label search needs SQLite or PostgreSQL, not {engine.dialect.name}")
    sql = _TEXT[engine.dialect.name]
    where, params = ["l.status <> 'rejected'"], {}
    for col, value in (("s.hook", hook), ("s.name", sae)):
        if value:
            key = f"p{len(params)}"
            where.append(f"{col} = :{key}")
            params[key] = value
    with engine.connect() as conn:
        if model:  # every recorded name of that model (saereg.registry.models)
            where.append(in_clause("s.model_id", model_ids(conn, model)))
    versions = where[1:]  # the filters that pick SAE versions
    if min_rate is not None:
        where.append("fs.firing_rate >= :min_rate")
        params["min_rate"] = min_rate
    if max_rate is not None:
        where.append("fs.firing_rate <= :max_rate")
        params["max_rate"] = max_rate
    with engine.connect() as conn:
        if sql["estimate"]:  # each statement reads a few pages: a parallel plan only adds the
            # start of its workers (~15 ms)
            conn.exec_driver_sql("SET LOCAL max_parallel_workers_per_gather = 0")
        found, total = _frequencies(conn, sql, words)
        rare, common = [], []
        for w in words:
            if found[w] is None:  # a stop word (PostgreSQL): ignored, as plainto_tsquery does
                continue
            if found[w] == 0:
                return []
            (rare if found[w] <= RANKED_DF else common).append(w)
        if not rare and not common:
            return []
        params["q"] = sql["query"](rare + common)
        if rare:
            rows = _ranked(conn, sql, rare, bool(common), where, params, limit)
        else:
            ranges = _id_ranges(conn, versions, params) if versions else [(0, 2 ** 62)]
            if sql["estimate"]:
                rows = _pg_newest(conn, where, params, limit, ranges, min_rate is not None
                                  or max_rate is not None, [found[w] for w in common], total)
            else:
                rows = _newest(conn, sql, where, params, limit, ranges)
        return _hits(rows, conn)


_COLUMNS = """SELECT l.id, l.version_id, l.feature_index, l.text, l.method, l.status,
               fs.firing_rate, s.name, v.number"""
_JOINS = """JOIN sae_versions v ON v.id = l.version_id
        JOIN saes s ON s.id = v.sae_id
        JOIN language_models m ON m.id = s.model_id
        LEFT JOIN feature_stats fs ON fs.feature_index = l.feature_index AND fs.stats_run_id =
            (SELECT max(r.id) FROM stats_runs r WHERE r.version_id = l.version_id)"""


def _fts_query(words: list[str]) -> str:
    return " ".join('"' + w.replace('"', "") + '"' for w in words)


PG_DOCUMENT = "to_tsvector('english', translate({col}, '<>/.@', '     '))"
"""A label as PostgreSQL's full-text search reads it (and its GIN index holds it, migration
0008): markup, paths and dotted names split into words first, as SQLite's tokenizer splits
them; PostgreSQL's own parser reads ``<div>`` as a tag and drops it with the words of
``'<b>bold</b>'`` and ``model.layers`` as one host name."""


_TEXT = {
    "sqlite": {
        "query": _fts_query,
        "estimate": None,
        "probe": "SELECT count(*) FROM (SELECT 1 FROM feature_labels_fts "
                 "WHERE feature_labels_fts MATCH :q LIMIT :cap)",
        "rank": "SELECT rowid, bm25(feature_labels_fts) FROM feature_labels_fts "
                "WHERE feature_labels_fts MATCH :rq ORDER BY rank, rowid DESC",
        "all": "SELECT rowid FROM feature_labels_fts WHERE feature_labels_fts MATCH :q",
        # CROSS JOIN keeps the full-text index the outer loop, read newest first and stopped
        # at :n; otherwise SQLite may read a whole version by another index and sort it
        "newest": f"""{_COLUMNS} FROM feature_labels_fts f
        CROSS JOIN feature_labels l ON l.id = f.rowid {_JOINS.replace("JOIN s", "CROSS JOIN s")
                                                              .replace("JOIN l", "CROSS JOIN l")}
        WHERE feature_labels_fts MATCH :q AND f.rowid >= :lo AND f.rowid < :before
          AND {{where}}
        ORDER BY f.rowid DESC LIMIT :n""",
    },
    "postgresql": {
        "query": " ".join,
        "estimate": "EXPLAIN (FORMAT JSON) ",
        "probe": "SELECT count(*) FROM (SELECT 1 FROM feature_labels WHERE "
                 f"{PG_DOCUMENT.format(col='text')} @@ plainto_tsquery('english', :q) "
                 "LIMIT :cap) x",
        "rank": f"SELECT id, -ts_rank({PG_DOCUMENT.format(col='text')}, "
                "plainto_tsquery('english', :rq)) AS score FROM feature_labels "
                f"WHERE {PG_DOCUMENT.format(col='text')} @@ plainto_tsquery('english', :q) "
                "ORDER BY score, id DESC",
        "all": None,  # the rank query matches every word itself
    },
}
_PG_LATEST_STATS = "(SELECT max(r.id) FROM stats_runs r WHERE r.version_id = {t}.version_id)"
_PG_NEWEST = f"""SELECT c.id, c.version_id, c.feature_index, c.text, c.method, c.status,
               CASE WHEN c.hit THEN (SELECT f.firing_rate FROM feature_stats f
                   WHERE f.feature_index = c.feature_index
                     AND f.stats_run_id = {_PG_LATEST_STATS.format(t="c")}) END,
               c.name, c.number, c.hit
        FROM (SELECT l.id, l.version_id, l.feature_index, l.text, l.method, l.status, s.name,
                     v.number, {{hit}} AS hit
              FROM feature_labels l JOIN sae_versions v ON v.id = l.version_id
              JOIN saes s ON s.id = v.sae_id JOIN language_models m ON m.id = s.model_id
              {{stats}}
              WHERE {{match}} l.id >= :lo AND l.id < :before AND {{where}}
              ORDER BY {{order}} DESC LIMIT :n) c
        ORDER BY c.id DESC"""
"""The labels through the filters in an id range, newest first, at most ``:n`` (PostgreSQL).
Read by id (``{hit}`` the match, computed for the rows read only, after the filters), or the
matches by the full-text index (``{match}``; ``l.id + 0`` keeps the planner off the id order,
which would recompute to_tsvector for every label read); the firing rate is looked up for the
matches only, after the LIMIT."""
_PG_TSQUERY = f"{PG_DOCUMENT.format(col='l.text')} @@ plainto_tsquery('english', :q)"
SCAN_US, HEAP_US, POSTING_US = 20.0, 4.0, 0.006
"""PostgreSQL cost model of a query of common words only, in microseconds (measured on a
catalog of 1,000,000 labels): a label read newest first (to_tsvector recomputed), a match
fetched through the full-text index, an entry of a word's posting list decoded."""


def _frequencies(conn, sql: dict, words: list[str]) -> tuple[dict, int | None]:
    """How many labels hold each word, counted up to RANKED_DF + 1 (None: a stop word), until
    a word no label holds; and, on PostgreSQL, the planner's count of labels. There a word
    the planner's statistics put in more labels than RANKED_DF is not counted (counting by
    the GIN index reads its whole posting list): its figure is the planner's estimate."""
    found: dict = {}
    if sql["estimate"]:
        keys = {f"w{i}": w for i, w in enumerate(dict.fromkeys(words))}
        nodes = conn.execute(text("SELECT " + ", ".join(
            f"numnode(plainto_tsquery('english', :{k}))" for k in keys)), keys).one()
        keys = {k: w for (k, w), n in zip(keys.items(), nodes) if n}
        found = dict.fromkeys(words)
        if not keys:
            return found, None
        plan = conn.execute(text(sql["estimate"] + " UNION ALL ".join(
            [f"SELECT 1 FROM feature_labels WHERE {PG_DOCUMENT.format(col='text')} @@ "
             f"plainto_tsquery('english', :{k})" for k in keys] +
            ["SELECT 1 FROM feature_labels"])), keys).scalar()
        if isinstance(plan, str):
            plan = json.loads(plan)
        node = plan[0]["Plan"]
        while node["Node Type"] != "Append":  # under a Gather, were the plan parallel
            node = node["Plans"][0]
        estimates = [p["Plan Rows"] for p in node["Plans"]]
        for (k, w), rows in zip(keys.items(), estimates):
            if rows > RANKED_DF:
                found[w] = rows
            else:
                n = conn.execute(text(sql["probe"]), {"q": w, "cap": RANKED_DF + 1}).scalar()
                found[w] = n if n <= RANKED_DF else max(rows, n)
                if not n:  # no match: the words after it need no count
                    break
        return found, max(estimates[-1], 1)
    for w in words:
        found[w] = conn.execute(text(sql["probe"]), {"q": sql["query"]([w]),
                                                     "cap": RANKED_DF + 1}).scalar()
        if not found[w]:
            break
    return found, None


def _id_ranges(conn, versions: list[str], params: dict) -> list[tuple[int, int]]:
    """The label-id ranges (highest first, disjoint) that hold every label of the SAE
    versions the model / hook / SAE filters pick: a version's labels are mostly written
    together, so reading only these ranges skips the rest of the catalog."""
    picked = conn.execute(text(
        "SELECT v.id FROM sae_versions v JOIN saes s ON s.id = v.sae_id "
        f"JOIN language_models m ON m.id = s.model_id WHERE {' AND '.join(versions)}"),
        params).scalars().all()
    spans = []
    for vid in picked:
        lo, hi = conn.execute(text(  # one aggregate per SELECT: an index lookup each
            "SELECT (SELECT min(id) FROM feature_labels WHERE version_id = :v), "
            "(SELECT max(id) FROM feature_labels WHERE version_id = :v)"), {"v": vid}).one()
        if lo is not None:
            spans.append((lo, hi))
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(spans, reverse=True, key=lambda r: r[1]):
        if merged and hi >= merged[-1][0]:
            merged[-1] = (min(lo, merged[-1][0]), merged[-1][1])
        else:
            merged.append((lo, hi))
    return merged


def _ranked(conn, sql: dict, rare: list[str], common: bool, where: list[str], params: dict,
            limit: int) -> list[tuple]:
    """Rows of the best label per feature, best first, at most ``limit``: the labels matching
    the rare words (at most :data:`RANKED_DF` of them) ranked, then read through the filters
    best first in growing batches until ``limit`` features passed."""
    from sqlalchemy import bindparam

    ranked = conn.execute(text(sql["rank"]), {"rq": sql["query"](rare), "q": params["q"]}).all()
    if common and sql["all"]:  # SQLite ranks by the rare words: keep labels with every word
        every = {r[0] for r in conn.execute(text(sql["all"]), {"q": params["q"]})}
        ranked = [r for r in ranked if r[0] in every]
    score = {r[0]: float(r[1]) for r in ranked}
    stmt = text(f"{_COLUMNS} FROM feature_labels l {_JOINS} "
                f"WHERE l.id IN :ids AND {' AND '.join(where)}"
                ).bindparams(bindparam("ids", expanding=True))
    out, seen, start, size = [], set(), 0, 2 * limit + 8
    while start < len(ranked) and len(out) < limit:
        ids = [r[0] for r in ranked[start:start + size]]
        start, size = start + size, min(4 * size, 5000)
        passed = {r[0]: r for r in conn.execute(stmt, {**params, "ids": ids})}
        for i in ids:
            r = passed.get(i)
            if r is not None and (r[1], r[2]) not in seen:
                seen.add((r[1], r[2]))
                out.append((*r, score[i]))
    return out[:limit]


def _newest(conn, sql: dict, where: list[str], params: dict, limit: int,
            ranges: list[tuple[int, int]]) -> list[tuple]:
    """Rows of the newest matching label per feature, newest first, at most ``limit``: the
    matches in the label-id ``ranges`` read newest first through the filters, in growing
    pages, until ``limit`` features passed."""
    stmt = text(sql["newest"].format(where=" AND ".join(where)))
    out, seen, size = [], set(), 2 * limit + 8
    for lo, hi in ranges:
        before = hi + 1
        while len(out) < limit:
            page = conn.execute(stmt, {**params, "lo": lo, "before": before, "n": size}).all()
            for r in page:
                if (r[1], r[2]) not in seen:
                    seen.add((r[1], r[2]))
                    out.append((*r, 0.0))
            if len(page) < size:
                break
            before, size = page[-1][0], min(4 * size, 5000)
    return out[:limit]


def _pg_newest(conn, where: list[str], params: dict, limit: int,
               ranges: list[tuple[int, int]], rated: bool, freqs: list[int],
               total: int) -> list[tuple]:
    """:func:`_newest` on PostgreSQL, for common words in ``freqs`` labels each (estimates;
    ``total`` labels in all): the labels are read newest first through the filters, the match
    computed on each label read, or the matches are fetched through the full-text index and
    sorted; :func:`_use_index` chooses before each page, so that common words seldom found
    together ("forest fires") go by the index and a common word alone by the id order."""
    latest = _PG_LATEST_STATS.format(t="l")
    joined = (f"JOIN feature_stats fs ON fs.feature_index = l.feature_index "
              f"AND fs.stats_run_id = {latest}") if rated else ""
    # the matches by the index: a lookup per match (OFFSET 0 keeps the subquery as written),
    # as a join the planner may hash every stats row in range of the rate filter
    looked_up = ("JOIN LATERAL (SELECT f.firing_rate FROM feature_stats f WHERE "
                 f"f.feature_index = l.feature_index AND f.stats_run_id = {latest} OFFSET 0) "
                 "fs ON true") if rated else ""
    filters = " AND ".join(where)
    scan = text(_PG_NEWEST.format(hit=_PG_TSQUERY, stats=joined, match="", order="l.id",
                                  where=filters))
    index = text(_PG_NEWEST.format(hit="true", stats=looked_up, match=_PG_TSQUERY + " AND",
                                   order="l.id + 0", where=filters))
    out, seen, size = [], set(), 2 * limit + 8

    def take(page: list) -> None:
        for r in page:
            if r[9] and (r[1], r[2]) not in seen:
                seen.add((r[1], r[2]))
                out.append((*r[:9], 0.0))

    read = 0
    for i, (lo, hi) in enumerate(ranges):
        before = hi + 1
        while len(out) < limit:
            left = before - lo + sum(b + 1 - a for a, b in ranges[i + 1:])  # ids unread
            if _use_index(read, min(left, (limit - len(out)) * total / min(freqs)), freqs):
                # the rest of the ranges by the index
                lo, n = ranges[-1][0], size
                while len(out) < limit:
                    page = conn.execute(index, {**params, "lo": lo, "before": before,
                                                "n": n}).all()
                    take(page)
                    if len(page) < n:
                        break
                    before, n = page[-1][0], min(4 * n, 5000)
                return out[:limit]
            page = conn.execute(scan, {**params, "lo": lo, "before": before, "n": size}).all()
            read += len(page)
            take(page)
            if len(page) < size:
                break
            before, size = page[-1][0], min(4 * size, 5000)
    return out[:limit]


def _use_index(read: int, least: float, freqs: list[int]) -> bool:
    """Whether a query of common words (in ``freqs`` labels each) that has read ``read``
    labels newest first and must read at least ``least`` more fetches the rest of its matches
    through the full-text index: when reading costs more than the index at most would (every
    label of the rarest word fetched, every posting list decoded). ``least``: the labels that
    hold the features still needed if every label of the rarest word held the other words,
    or the unread labels of the id ranges if fewer."""
    index_us = min(freqs) * HEAP_US + sum(freqs) * POSTING_US
    return (read + least) * SCAN_US > index_us


def _hits(rows: list[tuple], conn) -> list[SearchHit]:
    """SearchHits for (id, version_id, index, text, method, status, rate, sae, number, score)
    rows, each under its feature's current label (looked up on the connection ``conn``)."""
    wanted: dict[int, set[int]] = {}
    for r in rows:
        wanted.setdefault(r[1], set()).add(r[2])
    current = current_rows_of(wanted, None, conn)
    hits = []
    for r in rows:
        lab = current.get((r[1], r[2]))  # None only if rejected since the search: keep the match
        label, method, status = (r[3], r[4], r[5]) if lab is None else (lab.text, lab.method,
                                                                         lab.status)
        hits.append(SearchHit(f"{r[7]}@{r[8]}", r[2], label, method, status, r[6], 0.0 - r[9],
                              matched=None if lab is None or lab.id == r[0] else r[3]))
    return hits
