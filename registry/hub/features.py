"""``features.parquet``: what the catalog knows about each latent of a published version.

One row per latent, readable by any parquet reader (pandas, DuckDB, polars):

- ``feature_index`` (int32), ``log10_firing_rate`` (float64; from the training run's
  sparsity file, null when unknown);
- statistics of the newest stats run (null without one): ``firing_rate``,
  ``mean_activation``, ``max_activation`` (float64), ``flag`` ('dead', 'dense' or null), and
  JSON text columns ``histogram``, ``top_examples``, ``interval_examples``, ``top_logits``,
  ``bottom_logits``;
- ``label`` (the current label: the newest accepted one, else the newest candidate) and
  ``labels``: the whole label history of the latent, oldest first, as a list of structs (text,
  method, model, status, detection_score, created_at, created_by, and ``supersedes``: the
  position in the same list of the label it replaced).

The stats run's provenance (dataset, tokens, context size, code version, parameters, time and
author) is in the file's schema metadata under ``saereg.stats_run``. A pull writes the same
rows back (a stats run with its per-latent rows, and the label history with its authors and
times) inside the transaction that records the version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

STATS_META_KEY = b"saereg.stats_run"
STAT_NUMBERS = ("firing_rate", "mean_activation", "max_activation")
STAT_JSON = ("histogram", "top_examples", "interval_examples", "top_logits", "bottom_logits")
LABEL_FIELDS = ("text", "method", "model", "status", "detection_score", "created_at",
                "created_by", "supersedes")


@dataclass
class FeatureExport:
    """The per-latent contents of features.parquet."""

    d_sae: int
    log10_rates: list[float | None]
    stats_run: dict[str, Any] | None = None
    """Provenance of the statistics (None: the version has no stats run)."""
    stats: list[dict[str, Any]] = field(default_factory=list)
    """One dict per latent (STAT_NUMBERS, ``flag`` and STAT_JSON), when ``stats_run`` is set."""
    labels: list[list[dict[str, Any]]] = field(default_factory=list)
    """Per latent, its labels oldest first (LABEL_FIELDS; ``supersedes`` a list position)."""

    @property
    def n_labels(self) -> int:
        return sum(len(x) for x in self.labels)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat()


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def collect(s: Session, version_id: int, d_sae: int) -> FeatureExport:
    """Everything the catalog holds about the latents of one version."""
    from saereg.registry.catalog.feature_schema import FeatureLabel, FeatureStats, StatsRun
    from saereg.registry.catalog.schema import Feature

    rates: list[float | None] = [None] * d_sae
    for i, r in s.execute(select(Feature.feature_index, Feature.log10_firing_rate)
                          .where(Feature.version_id == version_id)):
        rates[i] = r
    out = FeatureExport(d_sae=d_sae, log10_rates=rates, labels=[[] for _ in range(d_sae)])
    run_id = s.scalar(select(func.max(StatsRun.id)).where(StatsRun.version_id == version_id))
    if run_id is not None:
        run = s.get(StatsRun, run_id)
        out.stats_run = {"dataset": run.dataset, "tokens": run.tokens,
                         "context_size": run.context_size, "code_version": run.code_version,
                         "params": run.params, "created_at": _iso(run.created_at),
                         "created_by": run.created_by}
        by_index = {row.feature_index: row for row in s.scalars(
            select(FeatureStats).where(FeatureStats.stats_run_id == run_id))}
        out.stats = [_stats_dict(by_index.get(i)) for i in range(d_sae)]
    position: dict[int, tuple[int, int]] = {}
    for row in s.scalars(select(FeatureLabel).where(FeatureLabel.version_id == version_id)
                         .order_by(FeatureLabel.id)):
        history = out.labels[row.feature_index]
        sup = position.get(row.supersedes_id) if row.supersedes_id is not None else None
        history.append({"text": row.text, "method": row.method, "model": row.model,
                        "status": row.status, "detection_score": row.detection_score,
                        "created_at": _iso(row.created_at), "created_by": row.created_by,
                        "supersedes": sup[1] if sup and sup[0] == row.feature_index else None})
        position[row.id] = (row.feature_index, len(history) - 1)
    return out


def _stats_dict(row) -> dict[str, Any]:  # noqa: ANN001 - a FeatureStats row or None
    if row is None:
        return {**dict.fromkeys(STAT_NUMBERS), "flag": None, **dict.fromkeys(STAT_JSON)}
    return {**{k: getattr(row, k) for k in STAT_NUMBERS}, "flag": row.flag,
            **{k: getattr(row, k) for k in STAT_JSON}}


def _label_type():
    import pyarrow as pa

    return pa.struct([("text", pa.string()), ("method", pa.string()), ("model", pa.string()),
                      ("status", pa.string()), ("detection_score", pa.float64()),
                      ("created_at", pa.string()), ("created_by", pa.string()),
                      ("supersedes", pa.int32())])


def write(path: Path, export: FeatureExport) -> None:
    """Write ``export`` as features.parquet at ``path``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from saereg.registry.catalog.feature_schema import current_label

    n = export.d_sae
    stats = export.stats or [_stats_dict(None)] * n
    columns: dict[str, Any] = {
        "feature_index": pa.array(range(n), pa.int32()),
        "log10_firing_rate": pa.array(export.log10_rates, pa.float64()),
    }
    for k in STAT_NUMBERS:
        columns[k] = pa.array([r[k] for r in stats], pa.float64())
    columns["flag"] = pa.array([r["flag"] for r in stats], pa.string())
    for k in STAT_JSON:
        columns[k] = pa.array([None if r[k] is None else json.dumps(r[k]) for r in stats],
                              pa.string())
    labels = export.labels or [[] for _ in range(n)]
    current = [current_label(h, lambda lab: lab["status"]) for h in labels]
    columns["label"] = pa.array([lab["text"] if lab else None for lab in current], pa.string())
    columns["labels"] = pa.array(labels, pa.list_(_label_type()))
    table = pa.table(columns)
    if export.stats_run is not None:
        table = table.replace_schema_metadata(
            {STATS_META_KEY: json.dumps(export.stats_run, sort_keys=True).encode()})
    pq.write_table(table, path)


def read(path: Path, d_sae: int) -> FeatureExport:
    """Read features.parquet (also an older one with only the first two columns)."""
    import pyarrow.parquet as pq

    from saereg.registry.errors import SAEFormatError

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise SAEFormatError(f"{path.name}: not a readable parquet file ({e})") from None
    names = set(table.column_names)
    if "feature_index" not in names:
        raise SAEFormatError(f"{path.name}: no feature_index column")
    index = table.column("feature_index").to_pylist()
    if sorted(index) != list(range(d_sae)):
        raise SAEFormatError(f"{path.name}: feature_index must list 0..{d_sae - 1} once each "
                             f"(the SAE has d_sae {d_sae}); it has {len(index)} rows")
    order = sorted(range(len(index)), key=index.__getitem__)

    def col(name: str) -> list[Any]:
        values = table.column(name).to_pylist() if name in names else [None] * d_sae
        return [values[i] for i in order]

    try:
        out = FeatureExport(d_sae=d_sae, log10_rates=col("log10_firing_rate"),
                            labels=[h or [] for h in col("labels")])
        meta = (table.schema.metadata or {}).get(STATS_META_KEY)
        if meta:
            out.stats_run = _json(meta, "the stats run (schema metadata)")
            numbers = {k: col(k) for k in (*STAT_NUMBERS, "flag")}
            texts = {k: col(k) for k in STAT_JSON}
            out.stats = [{**{k: v[i] for k, v in numbers.items()},
                          **{k: (_json(v[i], f"feature {i}: {k}") if v[i] is not None else None)
                             for k, v in texts.items()}} for i in range(d_sae)]
        check(out)
    except SAEFormatError as e:
        raise SAEFormatError(f"{path.name}: {e}; refusing it") from None
    return out


def _json(raw: str | bytes, what: str) -> Any:
    from saereg.registry.errors import SAEFormatError
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


# -- what a pull accepts ---------------------------------------------------------------------
# Every value of a features.parquet from elsewhere is checked for what the catalog and the
# pages that show it rely on (types, finite numbers, ranges, lengths the columns hold) before
# the pull records anything; a problem is one error naming the feature and the field.

def _fail(what: str, problem: str):
    from saereg.registry.errors import SAEFormatError

    raise SAEFormatError(f"{what} {problem}")


def _num(value: Any, what: str, *, low: float | None = None, high: float | None = None,
         optional: bool = False) -> None:
    import math

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
        _fail(what, f"must be an integer in {low}..{high}, not {value!r}")


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
    _num(r["firing_rate"], f"{where}: firing_rate", low=0.0, high=1.0)
    _num(r["mean_activation"], f"{where}: mean_activation")
    _num(r["max_activation"], f"{where}: max_activation")
    if r["flag"] not in (None, "dead", "dense"):
        _fail(f"{where}: flag", f"must be 'dead', 'dense' or null, not {r['flag']!r:.40}")
    hist = _dict(r["histogram"], f"{where}: histogram", ("log10_low", "log10_high", "counts"))
    _num(hist["log10_low"], f"{where}: histogram log10_low")
    _num(hist["log10_high"], f"{where}: histogram log10_high")
    if not hist["log10_low"] < hist["log10_high"]:
        _fail(f"{where}: histogram", "must have log10_low below log10_high")
    for c in _list(hist["counts"], f"{where}: histogram counts"):
        _int(c, f"{where}: a histogram count", high=2 ** 62)
    for j, ex in enumerate(_list(r["top_examples"], f"{where}: top_examples")):
        _example(ex, f"{where}: top example {j}")
    for j, iv in enumerate(_list(r["interval_examples"], f"{where}: interval_examples")):
        iv = _dict(iv, f"{where}: interval {j}", ("low", "high", "examples"))
        _num(iv["low"], f"{where}: interval {j} low")
        _num(iv["high"], f"{where}: interval {j} high")
        for m, ex in enumerate(_list(iv["examples"], f"{where}: interval {j} examples")):
            _example(ex, f"{where}: interval {j} example {m}")
    _logits(r["top_logits"], f"{where}: top_logits")
    _logits(r["bottom_logits"], f"{where}: bottom_logits")


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
    import math

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


def insert(s: Session, version_id: int, export: FeatureExport, *, source: str) -> None:
    """Record the statistics and labels of ``export`` (as :func:`read` returns it, checked)
    for a new version, inside ``s``'s transaction (the caller's registration), keeping authors
    and times."""
    from saereg.registry.catalog.feature_schema import FeatureLabel, FeatureStats, StatsRun
    from saereg.registry.catalog.schema import utcnow

    if export.stats_run is not None and export.stats:
        meta = export.stats_run
        run = StatsRun(version_id=version_id, dataset=str(meta.get("dataset") or "unknown"),
                       tokens=int(meta.get("tokens") or 0),
                       context_size=int(meta.get("context_size") or 0),
                       code_version=str(meta.get("code_version") or "unknown")[:64],
                       params={**(meta.get("params") or {}), "source": source},
                       created_at=_parse_time(meta.get("created_at")) or utcnow(),
                       created_by=str(meta.get("created_by") or "unknown"))
        s.add(run)
        s.flush()
        rows = [{"stats_run_id": run.id, "feature_index": i, **{
            k: (r[k] if r[k] is not None else default) for k, default in (
                ("firing_rate", 0.0), ("mean_activation", 0.0), ("max_activation", 0.0),
                ("flag", None), ("histogram", {}), ("top_examples", []),
                ("interval_examples", []), ("top_logits", []), ("bottom_logits", []))}}
            for i, r in enumerate(export.stats)]
        s.execute(FeatureStats.__table__.insert(), rows)
    checked = export.labels
    # round j inserts every feature's j-th label: what it supersedes (an earlier position) has
    # its id by then, and each round is one batched INSERT
    ids: list[list[int]] = [[] for _ in checked]
    for j in range(max((len(h) for h in checked), default=0)):
        batch = []
        for index, history in enumerate(checked):
            if j >= len(history):
                continue
            lab = history[j]
            sup = lab.get("supersedes")
            batch.append((index, FeatureLabel(
                version_id=version_id, feature_index=index, text=" ".join(lab["text"].split()),
                method=lab["method"], model=lab.get("model"), status=lab["status"],
                supersedes_id=ids[index][sup] if sup is not None else None,
                detection_score=lab.get("detection_score"),
                created_at=_parse_time(lab.get("created_at")) or utcnow(),
                created_by=str(lab.get("created_by") or "unknown"))))
        s.add_all([row for _, row in batch])
        s.flush()
        for index, row in batch:
            ids[index].append(row.id)
