"""Search over feature labels (SQLite FTS5 with bm25, PostgreSQL full text with ts_rank), the
features that fire on a prompt, and nearest features by decoder cosine.

Search matches every word of the query (stemmed) against every label a feature has had;
rejected labels never match. A feature is listed once, ranked by its best-matching label, and
shown with its current label (the one ``saereg feature show`` shows; the rule is
:func:`saereg.registry.catalog.feature_schema.current_label`); when the match came from another
label, such as one the current label superseded, the hit says which. Filters: model, hook, SAE
name, firing-rate range (from the version's latest stats run; each bound a finite number in
0..1, the lowest not above the highest).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import text

from saereg.registry.catalog import db
from saereg.registry.errors import ConfigError, UsageError
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


def _words(query: str) -> list[str]:
    words = re.findall(r"\w+", query or "", flags=re.UNICODE)
    if not words:
        raise UsageError(f"search needs at least one word, got {query!r}")
    return words[:16]


def search_labels(query: str, *, model: str | None = None, hook: str | None = None,
                  sae: str | None = None, min_rate: float | None = None,
                  max_rate: float | None = None, limit: int = 20,
                  database_url: str | None = None) -> list[SearchHit]:
    """Features with a label that contains every word of ``query``, best first, each shown
    with its current label."""
    words = _words(query)
    if limit < 1:
        raise UsageError(f"limit must be positive, got {limit}")
    if min_rate is not None:
        min_rate = finite_number(min_rate, "min_rate", minimum=0, maximum=1)
    if max_rate is not None:
        max_rate = finite_number(max_rate, "max_rate", minimum=0, maximum=1)
    if min_rate is not None and max_rate is not None and min_rate > max_rate:
        raise ConfigError(f"min_rate {min_rate:g} is above max_rate {max_rate:g}: no firing "
                          "rate lies between them", field="min_rate")
    engine = db.get_engine(database_url)
    params: dict = {"limit": limit}
    where = ["l.status <> 'rejected'"]
    if engine.dialect.name == "sqlite":
        params["q"] = " ".join('"' + w.replace('"', "") + '"' for w in words)
        source = ("SELECT l.*, bm25(feature_labels_fts) AS score FROM feature_labels_fts "
                  "JOIN feature_labels l ON l.id = feature_labels_fts.rowid "
                  "WHERE feature_labels_fts MATCH :q")
        order = "score ASC"
    elif engine.dialect.name == "postgresql":
        params["q"] = " ".join(words)
        source = ("SELECT l.*, -ts_rank(to_tsvector('english', l.text), "
                  "plainto_tsquery('english', :q)) AS score FROM feature_labels l "
                  "WHERE to_tsvector('english', l.text) @@ plainto_tsquery('english', :q)")
        order = "score ASC"
    else:
        raise UsageError(f"label search needs SQLite or PostgreSQL, not {engine.dialect.name}")
    for col, value in (("m.name", model), ("s.hook", hook), ("s.name", sae)):
        if value:
            key = f"p{len(params)}"
            where.append(f"{col} = :{key}")
            params[key] = value
    if min_rate is not None:
        where.append("fs.firing_rate >= :min_rate")
        params["min_rate"] = min_rate
    if max_rate is not None:
        where.append("fs.firing_rate <= :max_rate")
        params["max_rate"] = max_rate
    sql = f"""
        WITH hits AS ({source}), best AS (
            SELECT h.*, ROW_NUMBER() OVER (PARTITION BY h.version_id, h.feature_index
                                           ORDER BY h.score, h.id DESC) AS rn FROM hits h)
        SELECT s.name, v.number, l.feature_index, l.text, l.method, l.status,
               fs.firing_rate, l.score, l.version_id, l.id
        FROM best l
        JOIN sae_versions v ON v.id = l.version_id
        JOIN saes s ON s.id = v.sae_id
        JOIN language_models m ON m.id = s.model_id
        LEFT JOIN feature_stats fs ON fs.feature_index = l.feature_index AND fs.stats_run_id =
            (SELECT max(r.id) FROM stats_runs r WHERE r.version_id = l.version_id)
        WHERE l.rn = 1 AND {' AND '.join(where)}
        ORDER BY l.{order}, l.id
        LIMIT :limit"""
    with engine.connect() as conn:
        rows = conn.execute(text(sql), params).all()
    wanted: dict[int, set[int]] = {}
    for r in rows:
        wanted.setdefault(r[8], set()).add(r[2])
    current = {(vid, i): lab for vid, indices in wanted.items()
               for i, lab in _current_rows(vid, sorted(indices), database_url).items()}
    hits = []
    for r in rows:
        lab = current.get((r[8], r[2]))  # None only if rejected since the search: keep the match
        label, method, status = (r[3], r[4], r[5]) if lab is None else (lab.text, lab.method,
                                                                         lab.status)
        hits.append(SearchHit(f"{r[0]}@{r[1]}", r[2], label, method, status, r[6], -float(r[7]),
                              matched=None if lab is None or lab.id == r[9] else r[3]))
    return hits


@dataclass(frozen=True)
class TokenFeatures:
    token: str
    position: int
    features: list[tuple[int, float, str | None]]  # (index, activation, current label)


def explain_prompt(prompt: str, ref: str, *, top: int = 5,
                   database_url: str | None = None) -> list[TokenFeatures]:
    """The ``top`` features per token of ``prompt`` with their current labels."""
    import torch

    from saereg.analysis.lm import load_model
    from saereg.registry.api import get_version, load_sae
    from saereg.training.lm import ActivationCapture

    if not prompt or not prompt.strip():
        raise UsageError("explain-prompt needs a non-empty prompt")
    info = get_version(ref, database_url=database_url)
    lm = load_model(info.model)
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] > lm.context_limit:
        raise UsageError(f"the prompt is {ids.shape[1]} tokens, longer than the model's context "
                         f"({lm.context_limit})")
    sae = load_sae(info.ref, database_url=database_url)
    with torch.no_grad():
        acts = sae.encode(ActivationCapture(lm, [info.hook])(ids)[info.hook])[0]
    vals, idx = acts.topk(min(top, acts.shape[-1]), dim=-1)
    labels = current_labels(info.id, sorted(set(idx[vals > 0].tolist())), database_url)
    out = []
    for pos, tok in enumerate(lm.tokenizer.convert_ids_to_tokens(ids[0].tolist())):
        feats = [(int(i), float(v), labels.get(int(i))) for v, i in zip(vals[pos], idx[pos])
                 if v > 0]
        out.append(TokenFeatures(tok, pos, feats))
    return out


def current_labels(version_id: int, indices: list[int],
                   database_url: str | None = None) -> dict[int, str]:
    """Current label text per feature index (newest accepted, else newest candidate)."""
    return {i: lab.text for i, lab in _current_rows(version_id, indices, database_url).items()}


def _current_rows(version_id: int, indices: list[int], database_url: str | None):
    """The current label row (id, feature_index, text, method, status) per feature index of
    ``indices`` that has one."""
    from sqlalchemy import select

    from saereg.registry.catalog.feature_schema import FeatureLabel, current_label

    if not indices:
        return {}
    with db.session(database_url) as s:
        rows = s.execute(select(FeatureLabel.id, FeatureLabel.feature_index, FeatureLabel.text,
                                FeatureLabel.method, FeatureLabel.status)
                         .where(FeatureLabel.version_id == version_id,
                                FeatureLabel.feature_index.in_(indices),
                                FeatureLabel.status != "rejected")
                         .order_by(FeatureLabel.id)).all()
    by_index: dict[int, list] = {}
    for row in rows:
        by_index.setdefault(row.feature_index, []).append(row)
    return {i: current_label(h, lambda r: r.status) for i, h in by_index.items()}
