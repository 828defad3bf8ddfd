"""What a pull accepts from a ``features.parquet`` made elsewhere.

Every value is checked for what the catalog and the pages that show it rely on (types, finite
numbers, ranges, examples whose parts fit together, labels as the label commands accept them,
lengths the columns hold) before the pull records anything; a problem is one
:class:`SAEFormatError` naming the feature and the field.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

from saereg.registry.errors import SAEFormatError
from saereg.registry.hub.features import STAT_JSON, STAT_NUMBERS, FeatureExport


def parse_json(raw: str | bytes, what: str) -> Any:
    """JSON text from the file; not JSON, nested too deeply, or holding a NaN, an infinity or
    a NUL: SAEFormatError naming ``what``."""
    from saereg.registry.hub.verify import _unstorable

    try:
        value = json.loads(raw)
    except RecursionError:
        raise SAEFormatError(f"{what} nests too deeply") from None
    except ValueError as e:
        raise SAEFormatError(f"{what} is not JSON ({str(e).splitlines()[0]})") from None
    found = _unstorable(value, "")
    if found:
        raise SAEFormatError(f"{what}: {found}")
    return value


def _fail(what: str, problem: str):
    raise SAEFormatError(f"{what} {problem}")


def _num(value: Any, what: str, *, low: float | None = None, high: float | None = None,
         optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        _fail(what, f"must be a number, not {type(value).__name__}")
    if not math.isfinite(value):
        _fail(what, f"is not a finite number ({value})")
    if (low is not None and value < low) or (high is not None and value > high):
        _fail(what, f"must lie in [{low}, {high}], not {value}")


def _int(value: Any, what: str, *, low: int = 0, high: int = 2 ** 31 - 1,
         optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        _fail(what, f"must be an integer in {low}..{high}, not {value!r:.60}")


def _str(value: Any, what: str, *, most: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        _fail(what, f"must be a string, not {type(value).__name__}")
    if len(value) > most:
        _fail(what, f"is {len(value)} characters long; at most {most} are kept")


def _list(value: Any, what: str) -> list:
    if not isinstance(value, list):
        _fail(what, f"must be a list, not {type(value).__name__}")
    return value


def _or_empty(value: Any) -> Any:
    """A null JSON field as the catalog's default, an empty list; anything else as it is."""
    return [] if value is None else value


def _dict(value: Any, what: str, keys: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        _fail(what, f"must be an object, not {type(value).__name__}")
    missing = [k for k in keys if k not in value]
    if missing:
        _fail(what, f"lacks {', '.join(repr(k) for k in missing)}")
    return value


def _example(ex: Any, what: str) -> None:
    ex = _dict(ex, what, ("activation", "window", "position", "peak", "tokens", "acts"))
    _num(ex["activation"], f"{what}: activation")
    _int(ex["window"], f"{what}: window")
    _int(ex["position"], f"{what}: position")
    tokens = _list(ex["tokens"], f"{what}: tokens")
    if not tokens:
        _fail(f"{what}: tokens", "is empty")
    for t in tokens:
        _str(t, f"{what}: a token", most=256)
    _int(ex["peak"], f"{what}: peak", high=len(tokens) - 1)
    acts = _list(ex["acts"], f"{what}: acts")
    if len(acts) != len(tokens):
        _fail(f"{what}: acts", f"has {len(acts)} values for {len(tokens)} tokens")
    for a in acts:
        _num(a, f"{what}: an activation")
    if ex.get("token_ids") is not None:
        ids = _list(ex["token_ids"], f"{what}: token_ids")
        if len(ids) != len(tokens):
            _fail(f"{what}: token_ids", f"has {len(ids)} ids for {len(tokens)} tokens")
        for t in ids:
            _int(t, f"{what}: a token id")
    _str(ex.get("doc_id"), f"{what}: doc_id", most=1024, optional=True)
    _int(ex.get("doc_offset"), f"{what}: doc_offset", high=2 ** 62, optional=True)


def _logits(value: Any, what: str) -> None:
    for pair in _list(value, what):
        if not isinstance(pair, list) or len(pair) != 2:
            _fail(what, f"must hold [token, value] pairs, not {pair!r:.60}")
        _str(pair[0], f"{what}: a token", most=256)
        _num(pair[1], f"{what}: a value")


def _stats_row(r: dict[str, Any], where: str) -> None:
    """One latent's statistics; a null field is kept as the catalog's default (0, {}, [])."""
    _num(r["firing_rate"], f"{where}: firing_rate", low=0.0, high=1.0, optional=True)
    _num(r["mean_activation"], f"{where}: mean_activation", optional=True)
    _num(r["max_activation"], f"{where}: max_activation", optional=True)
    if r["flag"] not in (None, "dead", "dense"):
        _fail(f"{where}: flag", f"must be 'dead', 'dense' or null, not {r['flag']!r:.40}")
    if r["histogram"] is not None:
        hist = _dict(r["histogram"], f"{where}: histogram",
                     ("log10_low", "log10_high", "counts"))
        _num(hist["log10_low"], f"{where}: histogram log10_low")
        _num(hist["log10_high"], f"{where}: histogram log10_high")
        if not hist["log10_low"] < hist["log10_high"]:
            _fail(f"{where}: histogram", "must have log10_low below log10_high")
        for c in _list(hist["counts"], f"{where}: histogram counts"):
            _int(c, f"{where}: a histogram count", high=2 ** 62)
    for j, ex in enumerate(_list(_or_empty(r["top_examples"]), f"{where}: top_examples")):
        _example(ex, f"{where}: top example {j}")
    intervals = _list(_or_empty(r["interval_examples"]), f"{where}: interval_examples")
    for j, iv in enumerate(intervals):
        iv = _dict(iv, f"{where}: interval {j}", ("low", "high", "examples"))
        _num(iv["low"], f"{where}: interval {j} low")
        _num(iv["high"], f"{where}: interval {j} high")
        for m, ex in enumerate(_list(iv["examples"], f"{where}: interval {j} examples")):
            _example(ex, f"{where}: interval {j} example {m}")
    _logits(_or_empty(r["top_logits"]), f"{where}: top_logits")
    _logits(_or_empty(r["bottom_logits"]), f"{where}: bottom_logits")


def _time(value: Any, what: str) -> None:
    if value is None:
        return
    _str(value, what, most=64)
    try:
        datetime.fromisoformat(value)
    except ValueError:
        _fail(what, f"is not an ISO 8601 time ({value!r})")


def _label(lab: dict[str, Any], j: int, where: str) -> None:
    from saereg.registry.catalog.feature_schema import (LABEL_METHODS, LABEL_STATUSES,
                                                        label_text_problem)

    if lab.get("method") not in LABEL_METHODS or lab.get("status") not in LABEL_STATUSES:
        _fail(where, f"has a label with method {lab.get('method')!r:.40} / status "
                     f"{lab.get('status')!r:.40}")
    text = lab.get("text")
    if not isinstance(text, str) or not text.strip():
        _fail(where, "has an empty label")
    problem = label_text_problem(" ".join(text.split()))
    if problem:
        _fail(f"{where}: label {j}", problem.replace("a label ", "", 1))
    _str(lab.get("model"), f"{where}: label {j} model", most=256, optional=True)
    _str(lab.get("created_by"), f"{where}: label {j} created_by", most=128, optional=True)
    _time(lab.get("created_at"), f"{where}: label {j} created_at")
    _num(lab.get("detection_score"), f"{where}: label {j} detection_score", low=0.0, high=1.0,
         optional=True)
    sup = lab.get("supersedes")
    if sup is not None and not 0 <= sup < j:
        _fail(where, f"has a label that supersedes position {sup}, which is not an earlier "
                     "label of the same feature")


def check(export: FeatureExport) -> None:
    """Refuse (SAEFormatError naming the feature and field) what the catalog cannot keep or
    show from ``export``: rates that are NaN or above 1, non-finite statistics, examples whose
    parts do not fit together, labels it would refuse from a user, and over-long names."""
    for i, rate in enumerate(export.log10_rates):
        if rate is not None and (not isinstance(rate, float) or math.isnan(rate) or rate > 0):
            _fail(f"feature {i}: log10_firing_rate", f"must be at most 0 (or -inf), not {rate}")
    if export.stats_run is not None:
        meta = _dict(export.stats_run, "the stats run (schema metadata)", ())
        where = "the stats run"
        _str(meta.get("dataset"), f"{where}: dataset", most=4096, optional=True)
        _int(meta.get("tokens"), f"{where}: tokens", high=2 ** 62, optional=True)
        _int(meta.get("context_size"), f"{where}: context_size", optional=True)
        _str(meta.get("created_by"), f"{where}: created_by", most=128, optional=True)
        _time(meta.get("created_at"), f"{where}: created_at")
        if meta.get("params") is not None:
            _dict(meta["params"], f"{where}: params", ())
        for i, r in enumerate(export.stats):
            if any(r[k] is not None for k in (*STAT_NUMBERS, *STAT_JSON)):
                _stats_row(r, f"feature {i}")
    for i, history in enumerate(export.labels):
        for j, lab in enumerate(history):
            _label(lab, j, f"feature {i}")
