"""The data of every page, as plain JSON-ready dicts: the HTML page renders it and its twin
under ``/api`` returns it as it is.

Everything is read through the library (the catalog's queries, stats, labels, search,
neighbours, steering presets), the same calls the command line makes. The few reads the
library has no function for (a version's publications, presets and steering runs, its
feature overview) are plain SELECTs here; nothing in this module writes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select

from saereg.analysis.tokens import display_token
from saereg.registry.catalog import db
from saereg.registry.errors import UsageError
from saereg.registry.refs import parse_ref

OTHER_VERSIONS = 3
"""Other versions on the same model and hook whose nearest features a feature page shows."""
OVERVIEW = 50
"""Live features listed on a version page (the most often firing)."""


def when(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt else None


def _catalog(database_url):
    from saereg.registry.catalog.writes import Catalog

    return Catalog(database_url)


def get_version(ref: str, database_url: str | None = None):
    """The catalog version ``ref`` names (``NAME``, ``NAME@3``, ``NAME@alias``, or the
    ``saelens://RELEASE/ID`` of a release SAE already pulled; nothing is downloaded here)."""
    parsed = parse_ref(ref)
    if parsed.kind not in ("catalog", "release"):
        raise UsageError(f"{ref!r} is not a catalog reference (NAME, NAME@3, NAME@alias, "
                         "saelens://RELEASE/ID)")
    return _catalog(database_url).get(parsed)


def _row(r) -> dict[str, Any]:
    return {"ref": r.ref, "name": r.name, "version": r.number, "aliases": r.aliases,
            "model": r.model, "hook": r.hook, "architecture": r.architecture, "d_sae": r.d_sae,
            "explained_variance": r.explained_variance, "l0": r.l0,
            "ce_loss_score": r.ce_loss_score, "dead_fraction": r.dead_fraction,
            "status": r.status, "created_at": when(r.created_at)}


def tag_filters(tags: list[str]) -> dict[str, str | None]:
    """``KEY=VALUE`` or ``KEY`` (any value), as ``saereg sae list --tag`` reads them."""
    out: dict[str, str | None] = {}
    for item in tags:
        key, sep, value = item.strip().partition("=")
        if key:
            out[key] = value if sep else None
    return out


def saes(*, model: str | None = None, hook: str | None = None, arch: str | None = None,
         tag: list[str] | None = None, database_url: str | None = None) -> dict[str, Any]:
    cat = _catalog(database_url)
    rows = cat.list(model=model or None, hook=hook or None, architecture=arch or None,
                    tags=tag_filters(tag or []))
    every = cat.list() if (model or hook or arch or tag) else rows
    return {"filters": {"model": model or "", "hook": hook or "", "arch": arch or "",
                        "tag": tag or []},
            "versions": [_row(r) for r in rows],
            "choices": {"model": sorted({r.model for r in every}),
                        "hook": sorted({r.hook for r in every}),
                        "arch": sorted({r.architecture for r in every})}}


def _publications(s, version_id: int) -> list[dict[str, Any]]:
    from saereg.registry.catalog.schema import Publication

    rows = s.scalars(select(Publication).where(Publication.version_id == version_id)
                     .order_by(Publication.id)).all()
    return [{"direction": p.direction, "repo": p.repo, "path": p.path, "revision": p.revision,
             "commit": p.commit, "created_at": when(p.created_at), "created_by": p.created_by}
            for p in rows]


def _overview(s, info, database_url) -> dict[str, Any]:
    """The version's latest stats run: its summary and the most often firing live features."""
    from sqlalchemy import func

    from saereg.analysis.current import current_labels
    from saereg.analysis.stats import latest_run_id
    from saereg.registry.catalog.feature_schema import FeatureStats, StatsRun

    run_id = latest_run_id(s, info.id)
    if run_id is None:
        return {"run": None, "features": [], "first_live": None, "counts": {}}
    run = s.get(StatsRun, run_id)
    counts = dict(s.execute(select(FeatureStats.flag, func.count())
                            .where(FeatureStats.stats_run_id == run_id)
                            .group_by(FeatureStats.flag)).all())
    live = FeatureStats.flag.is_(None) | (FeatureStats.flag == "dense")
    first = s.scalar(select(func.min(FeatureStats.feature_index))
                     .where(FeatureStats.stats_run_id == run_id, live))
    rows = s.execute(select(FeatureStats.feature_index, FeatureStats.firing_rate,
                            FeatureStats.max_activation, FeatureStats.flag)
                     .where(FeatureStats.stats_run_id == run_id, live)
                     .order_by(FeatureStats.firing_rate.desc(), FeatureStats.feature_index)
                     .limit(OVERVIEW)).all()
    labels = current_labels(info.id, [r[0] for r in rows], database_url)
    return {"run": _run(run), "first_live": first,
            "counts": {"live": sum(n for f, n in counts.items() if f != "dead"),
                       "dead": counts.get("dead", 0), "dense": counts.get("dense", 0)},
            "features": [{"index": i, "firing_rate": rate, "max_activation": peak,
                          "flag": flag, "label": labels.get(i)}
                         for i, rate, peak, flag in rows]}


def _run(run) -> dict[str, Any]:
    return {"id": run.id, "dataset": run.dataset, "tokens": run.tokens,
            "context_size": run.context_size, "code_version": run.code_version,
            "created_at": when(run.created_at), "created_by": run.created_by}


def version(ref: str, database_url: str | None = None) -> dict[str, Any]:
    from saereg.registry.catalog.queries import flatten, lineage_fields

    cat = _catalog(database_url)
    v = get_version(ref, database_url)
    with db.session(database_url) as s:
        publications = _publications(s, v.id)
        overview = _overview(s, v, database_url)
    others = {r.ref: r for r in [*cat.list(name=v.name), *cat.list(model=v.model, hook=v.hook)]
              if r.ref != v.ref}
    return {"ref": v.ref, "name": v.name, "version": v.number, "status": v.status,
            "deprecation_reason": v.deprecation_reason, "aliases": v.aliases,
            "lineage": {**lineage_fields(v), "context_size": v.context_size,
                        "mlflow_model_version": v.mlflow_model_version,
                        "source": f"{v.source_kind}: {v.source_uri}",
                        "created_at": when(v.created_at), "created_by": v.created_by},
            "config": v.config, "config_flat": flatten(v.config), "params": v.params,
            "metrics": v.metrics, "key_metrics": v.key_metrics, "tags": v.tags,
            "notes": [{"at": when(at), "by": by, "text": t} for at, by, t in v.notes],
            "files": [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in v.files],
            "alias_history": [{"alias": e.alias, "action": e.action, "version": e.version,
                               "previous": e.previous, "at": when(e.at), "by": e.by}
                              for e in cat.alias_history(v.name)],
            "publications": publications, "stats": overview,
            "diff_choices": sorted(others)[:200]}


def diff(ref: str, other: str, database_url: str | None = None) -> dict[str, Any]:
    from saereg.registry.catalog.queries import diff_versions

    a, b = get_version(ref, database_url), get_version(other, database_url)
    d = diff_versions(a, b)
    return {"left": a.ref, "right": b.ref, "same_weights": d.same_weights,
            "config": [{"key": k, "left": x, "right": y} for k, x, y in d.config],
            "metrics": [{"key": k, "left": x, "right": y,
                         "delta": y - x if x is not None and y is not None else None}
                        for k, x, y in d.metrics]}


def _label(lab) -> dict[str, Any]:
    return {"id": lab.id, "text": lab.text, "method": lab.method, "model": lab.model,
            "status": lab.status, "author": lab.author, "created_at": when(lab.created_at),
            "supersedes": lab.supersedes, "score": lab.detection_score}


def _example(ex: dict) -> dict[str, Any]:
    return {"activation": ex["activation"], "peak": ex["peak"],
            "tokens": [display_token(t) for t in ex["tokens"]], "acts": ex["acts"],
            "doc_id": ex.get("doc_id"), "doc_offset": ex.get("doc_offset")}


def histogram(hist: dict) -> dict[str, Any]:
    """The stored histogram (counts on fixed log10 bins) with each bin's range."""
    counts, lo, hi = hist["counts"], hist["log10_low"], hist["log10_high"]
    width = (hi - lo) / max(len(counts), 1)
    return {"log10_low": lo, "log10_high": hi, "counts": counts,
            "bins": [{"low": 10 ** (lo + i * width), "high": 10 ** (lo + (i + 1) * width),
                      "count": c} for i, c in enumerate(counts)]}


def _stats(run, st) -> dict[str, Any] | None:
    if run is None or st is None:
        return None
    return {"run": _run(run), "firing_rate": st.firing_rate,
            "mean_activation": st.mean_activation, "max_activation": st.max_activation,
            "flag": st.flag, "histogram": histogram(st.histogram),
            "top_examples": [_example(e) for e in st.top_examples],
            "interval_examples": [{"low": iv["low"], "high": iv["high"],
                                   "examples": [_example(e) for e in iv["examples"]]}
                                  for iv in st.interval_examples],
            "top_logits": [[display_token(t), v] for t, v in st.top_logits],
            "bottom_logits": [[display_token(t), v] for t, v in st.bottom_logits]}


def _neighbors(info, index: int, database_url, models=None) -> list[dict[str, Any]]:
    """Nearest features by decoder cosine in this version and in a few other versions on the
    same model and hook: stored ones when the library has them, else computed from the
    server's loaded SAEs (not written: a page view stays a read)."""
    from saereg.analysis.neighbors import neighbors

    others = [r.ref for r in _catalog(database_url).list(model=info.model, hook=info.hook)
              if r.ref != info.ref][-OTHER_VERSIONS:]
    load = models.sae if models is not None else None
    out = []
    for other in [None, *others]:
        group: dict[str, Any] = {"ref": other or info.ref, "same_version": other is None,
                                 "features": [], "error": None}
        try:
            group["features"] = [{"ref": n.ref, "index": n.index, "cosine": n.cosine,
                               "label": n.label}
                              for n in neighbors(info, index, other=other, k=8,
                                                 database_url=database_url, load=load,
                                                 store=False)]
        except Exception as e:  # noqa: BLE001 - one section of the page, not the page
            from saereg.analysis.web.errors import describe

            group["error"] = describe(e)[1]
        out.append(group)
    return out


def presets_using(info, index: int | None = None, database_url: str | None = None
                  ) -> list[dict[str, Any]]:
    """Preset versions bound to ``info`` (newest first) or, with ``index``, every preset
    version that steers that feature of ``info``."""
    from saereg.registry.catalog.feature_schema import SteeringPreset

    with db.session(database_url) as s:
        q = select(SteeringPreset).order_by(SteeringPreset.name, SteeringPreset.number.desc())
        if index is None:
            q = q.where(SteeringPreset.version_id == info.id)
        rows = s.scalars(q).all()
        out = []
        for p in rows:
            feats = [f for f in p.features or [] if index is None or (
                f.get("version_id") == info.id and f.get("index") == index)]
            if index is not None and not feats:
                continue
            out.append({"name": p.name, "version": p.number, "ref": f"{p.name}@{p.number}",
                        "method": p.method, "generation": p.generation,
                        "features": [{"sae": f.get("sae"), "index": f.get("index"),
                                      "strength": f.get("strength")} for f in feats],
                        "created_at": when(p.created_at), "created_by": p.created_by})
        return out


def feature(ref: str, index: int, database_url: str | None = None, models=None
            ) -> dict[str, Any]:
    """A feature's dashboard; ``models`` (a :class:`~.warm.WarmModels`) serves the SAEs
    that nearest features are computed from, when they are not stored yet."""
    from saereg.analysis.labels import current, history
    from saereg.analysis.stats import feature_stats

    info, run, st = feature_stats(get_version(ref, database_url), index,
                                  database_url=database_url)
    labels = history(info, index, database_url=database_url)
    cur = current(labels)
    return {"ref": info.ref, "name": info.name, "version": info.number, "index": index,
            "d_sae": info.d_sae, "model": info.model, "hook": info.hook,
            "stats": _stats(run, st), "label": _label(cur) if cur else None,
            "labels": [_label(lab) for lab in labels],
            "neighbors": _neighbors(info, index, database_url, models),
            "presets": presets_using(info, index, database_url),
            "prev": index - 1 if index > 0 else None,
            "next": index + 1 if index + 1 < info.d_sae else None}


SEARCH_MODES = ("words", "meaning", "hybrid")


def _hit(h) -> dict[str, Any]:
    return {"ref": h.ref, "index": h.feature_index, "label": h.label, "method": h.method,
            "status": h.status, "firing_rate": h.firing_rate, "rank": h.rank,
            "matched": h.matched}


def search(q: str, *, model: str | None = None, hook: str | None = None,
           sae: str | None = None, min_rate: float | None = None,
           max_rate: float | None = None, limit: int = 50, mode: str = "words",
           database_url: str | None = None) -> dict[str, Any]:
    """Word, meaning or hybrid search. By meaning (or hybrid) with a model and no SAE the
    query runs over every SAE of the model: ``groups`` holds each version's best ``limit``
    hits (``hits`` all of them, group after group); otherwise ``groups`` is None."""
    from saereg.analysis.search import search_labels

    if mode not in SEARCH_MODES:
        raise UsageError(f"mode must be one of {', '.join(SEARCH_MODES)}, got {mode!r}")
    kw = dict(hook=hook or None, min_rate=min_rate, max_rate=max_rate, limit=limit,
              database_url=database_url)
    groups = None
    if mode == "words":
        hits = search_labels(q, model=model or None, sae=sae or None, **kw)
    else:
        from saereg.analysis import semantic

        if model and not sae:
            found = semantic.search_meaning_grouped(q, model=model, hybrid=mode == "hybrid", **kw)
            groups = [{"ref": g.ref, "sae": g.sae, "version": g.version, "hook": g.hook,
                       "hits": [_hit(h) for h in g.hits]} for g in found]
            hits = [h for g in found for h in g.hits]
        else:
            hits = semantic.search_meaning(q, model=model or None, sae=sae or None,
                                           hybrid=mode == "hybrid", **kw)
    return {"q": q, "mode": mode,
            "filters": {"model": model or "", "hook": hook or "", "sae": sae or "",
                        "min_rate": min_rate, "max_rate": max_rate},
            "hits": [_hit(h) for h in hits], "groups": groups}


def steering_runs(info, database_url: str | None = None, limit: int = 50
                  ) -> list[dict[str, Any]]:
    """The stored steering runs of presets bound to ``info``, newest first."""
    from saereg.registry.catalog.feature_schema import SteeringPreset, SteeringRun

    with db.session(database_url) as s:
        rows = s.execute(select(SteeringRun, SteeringPreset.name, SteeringPreset.number)
                         .join(SteeringPreset, SteeringRun.preset_id == SteeringPreset.id)
                         .where(SteeringPreset.version_id == info.id)
                         .order_by(SteeringRun.id.desc()).limit(limit)).all()
        return [{"id": r.id, "preset": f"{name}@{number}", "prompt": r.prompt, "seed": r.seed,
                 "default": r.default_text, "steered": r.steered_text,
                 "created_at": when(r.created_at), "created_by": r.created_by}
                for r, name, number in rows]


def steering(ref: str, database_url: str | None = None) -> dict[str, Any]:
    """What the steering page of ``ref`` offers: its presets and its stored runs."""
    info = get_version(ref, database_url)
    return {"ref": info.ref, "model": info.model, "hook": info.hook, "d_sae": info.d_sae,
            "presets": presets_using(info, None, database_url),
            "runs": steering_runs(info, database_url)}
