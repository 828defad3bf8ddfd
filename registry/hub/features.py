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
times) inside the transaction that records the version, once :func:`read` has checked every
value (:mod:`saereg.registry.hub.feature_checks`).
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
    from saereg.registry.hub.feature_checks import check, parse_json

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
            out.stats_run = parse_json(meta, "the stats run (schema metadata)")
            numbers = {k: col(k) for k in (*STAT_NUMBERS, "flag")}
            texts = {k: col(k) for k in STAT_JSON}
            out.stats = [{**{k: v[i] for k, v in numbers.items()},
                          **{k: (parse_json(v[i], f"feature {i}: {k}") if v[i] is not None
                                 else None)
                             for k, v in texts.items()}} for i in range(d_sae)]
        check(out)
    except SAEFormatError as e:
        raise SAEFormatError(f"{path.name}: {e}; refusing it") from None
    return out


def _moment(value: datetime | str | None) -> str | None:
    """A time as one comparable string (UTC, ISO 8601), from the catalog or from the file."""
    if isinstance(value, str):
        value = _parse_time(value)
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat()


def _label_key(index: int, text: str, method: str, model: str | None, author: str | None,
               when: datetime | str | None) -> tuple:
    return (index, " ".join(text.split()), method, model, author or "unknown", _moment(when))


def _run_key(dataset, tokens, context_size, code_version, author, when) -> tuple:  # noqa: ANN001
    return (str(dataset or "unknown"), int(tokens or 0), int(context_size or 0),
            str(code_version or "unknown")[:64], str(author or "unknown"), _moment(when))


@dataclass
class Merged:
    """What :func:`merge` recorded."""

    labels: int = 0
    stats_tokens: int | None = None
    """Tokens of the stats run it recorded (None: none, or one the version had already)."""


def merge(s: Session, version_id: int, export: FeatureExport, *, source: str) -> Merged:
    """Record the statistics and labels of ``export`` (as :func:`read` returns it, checked)
    that version ``version_id`` does not hold yet, inside ``s``'s transaction, keeping authors
    and times: the whole of it for a version being registered, and for one pulled before, the
    stats run and the labels added upstream since. A label is the same when its feature, text,
    method, model, author and time are (without a time in the file: the rest); what it
    supersedes maps to the catalog's copy of that label. Statuses already recorded stay."""
    from saereg.registry.catalog.feature_schema import FeatureLabel, FeatureStats, StatsRun
    from saereg.registry.catalog.schema import utcnow

    out = Merged()
    meta = export.stats_run
    if meta is not None and export.stats:
        timed = meta.get("created_at") is not None
        have = {_run_key(r.dataset, r.tokens, r.context_size, r.code_version, r.created_by,
                         r.created_at if timed else None)
                for r in s.scalars(select(StatsRun).where(StatsRun.version_id == version_id))}
        if _run_key(meta.get("dataset"), meta.get("tokens"), meta.get("context_size"),
                    meta.get("code_version"), meta.get("created_by"),
                    meta.get("created_at")) not in have:
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
            out.stats_tokens = run.tokens
    existing: dict[tuple, int] = {}
    for row in s.execute(select(FeatureLabel.id, FeatureLabel.feature_index, FeatureLabel.text,
                                FeatureLabel.method, FeatureLabel.model,
                                FeatureLabel.created_by, FeatureLabel.created_at)
                         .where(FeatureLabel.version_id == version_id)
                         .order_by(FeatureLabel.id)):
        for when in (row.created_at, None):  # found by its time, or by the rest without one
            existing.setdefault(_label_key(row.feature_index, row.text, row.method, row.model,
                                           row.created_by, when), row.id)
    checked = export.labels
    # round j records every feature's j-th label: what it supersedes (an earlier position) has
    # its id by then, and each round is one batched INSERT
    ids: list[list[int]] = [[] for _ in checked]
    for j in range(max((len(h) for h in checked), default=0)):
        batch = []
        for index, history in enumerate(checked):
            if j >= len(history):
                continue
            lab = history[j]
            key = _label_key(index, lab["text"], lab["method"], lab.get("model"),
                             lab.get("created_by"), lab.get("created_at"))
            if key in existing:
                ids[index].append(existing[key])
                continue
            sup = lab.get("supersedes")
            batch.append((index, FeatureLabel(
                version_id=version_id, feature_index=index, text=" ".join(lab["text"].split()),
                method=lab["method"], model=lab.get("model"), status=lab["status"],
                supersedes_id=ids[index][sup] if sup is not None else None,
                detection_score=lab.get("detection_score"),
                created_at=_parse_time(lab.get("created_at")) or utcnow(),
                created_by=str(lab.get("created_by") or "unknown"))))
            ids[index].append(-1)  # its id, once flushed
        s.add_all([row for _, row in batch])
        s.flush()
        for index, row in batch:
            ids[index][j] = row.id
        out.labels += len(batch)
    return out
