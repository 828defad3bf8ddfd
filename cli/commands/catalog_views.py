"""Rich renderings of catalog results for the CLI (tables for list, show, diff, history)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from saereg.registry.catalog.queries import (AliasEventInfo, VersionDiff, VersionInfo, VersionRow,
                                             flatten, lineage_fields)

KEY_COLUMNS = (("EV", "explained_variance"), ("L0", "l0"), ("CE score", "ce_loss_score"),
               ("dead", "dead_fraction"))


def num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def when(dt: datetime | None) -> str:
    return dt.strftime("%Y-%m-%d %H:%M UTC") if dt else "-"


def size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def versions_table(rows: list[VersionRow]) -> Table:
    table = Table(title=f"{len(rows)} version{'s' * (len(rows) != 1)}", title_justify="left")
    for col, kw in (("SAE", {}), ("aliases", {}), ("model", {}), ("hook", {}), ("arch", {}),
                    ("d_sae", {"justify": "right"}), *((c, {"justify": "right"})
                                                        for c, _ in KEY_COLUMNS),
                    ("status", {}), ("created", {})):
        table.add_column(col, **kw)
    for r in rows:
        style = "dim" if r.status == "deprecated" else None
        table.add_row(r.ref, ", ".join(r.aliases), r.model, r.hook, r.architecture,
                      num(r.d_sae), *(num(getattr(r, attr)) for _, attr in KEY_COLUMNS),
                      r.status, when(r.created_at), style=style)
    return table


def _kv(rows: list[tuple[str, Any]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for key, value in rows:
        grid.add_row(key, value if isinstance(value, Text) else Text(str(value)))
    return grid


def show_version(v: VersionInfo) -> Group:
    status = Text(v.status, style="yellow" if v.deprecated else "green")
    head = Text.assemble((v.ref, "bold"), "  ", status,
                         f"  aliases: {', '.join(v.aliases) or '-'}")
    run = v.mlflow_run_id or "-"
    mlflow = f"model version {v.name}/{v.mlflow_model_version}" if v.mlflow_model_version else "-"
    rows = [("model", v.model), ("hook", v.hook),
            ("architecture", f"{v.architecture}  d_in {v.d_in}  d_sae {v.d_sae}"),
            ("created", f"{when(v.created_at)} by {v.created_by}"),
            ("source", f"{v.source_kind}: {v.source_uri}"), ("MLflow run", run),
            ("MLflow registry", mlflow), ("dataset", v.dataset or "-"),
            ("training tokens", num(v.training_tokens)),
            ("context size", num(v.context_size)), ("parent", v.parent or "-"),
            ("artifact store", v.artifact_uri),
            ("tags", ", ".join(f"{k}={x}" for k, x in v.tags.items()) or "-")]
    if v.deprecated:
        rows.insert(0, ("deprecated", Text(f"{when(v.deprecated_at)}: {v.deprecation_reason}",
                                           style="yellow")))
    files = Table("file", "size", "sha256", title="files", title_justify="left")
    for f in v.files:
        files.add_row(f.name, size(f.size), f.sha256)
    metrics = Table("metric", "value", title="metrics", title_justify="left")
    key = {"eval/explained_variance", "eval/l0", "eval/ce_loss_score", "eval/kl_div",
           "final/dead_fraction", "eval/mse", "eval/shrinkage"}
    for name in sorted(v.metrics, key=lambda k: (k not in key, k)):
        metrics.add_row(name, num(v.metrics[name], 4))
    config = Table("config", "value", title="config (cfg.json)", title_justify="left")
    for name, value in flatten(v.config).items():
        config.add_row(name, json.dumps(value) if not isinstance(value, str) else value)
    parts: list[Any] = [head, _kv(rows), files]
    if v.metrics:
        parts.append(metrics)
    parts.append(config)
    if v.notes:
        notes = Table("when", "by", "note", title="notes", title_justify="left")
        for at, by, text in v.notes:
            notes.add_row(when(at), by, text)
        parts.append(notes)
    return Group(*parts)


def version_json(v: VersionInfo) -> dict[str, Any]:
    return {"ref": v.ref, "name": v.name, "version": v.number, "status": v.status,
            "deprecation_reason": v.deprecation_reason, "aliases": v.aliases,
            **lineage_fields(v), "context_size": v.context_size,
            "mlflow_model_version": v.mlflow_model_version, "created_at": str(v.created_at),
            "created_by": v.created_by, "source": v.source_uri, "artifact_uri": v.artifact_uri,
            "files": [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in v.files],
            "tags": v.tags, "metrics": v.metrics, "config": v.config, "params": v.params,
            "notes": [{"at": str(at), "by": by, "text": t} for at, by, t in v.notes]}


def diff_table(d: VersionDiff) -> Group:
    a, b = d.left.ref, d.right.ref
    config = Table("key", a, b, title="config and lineage (differences only)",
                   title_justify="left")
    for key, x, y in d.config:
        config.add_row(key, _short(x), _short(y))
    if not d.config:
        config.add_row("(identical)", "", "")
    metrics = Table("metric", a, b, "delta", title="metrics", title_justify="left")
    for key, x, y in d.metrics:
        delta = num(y - x, 4) if x is not None and y is not None else ""
        metrics.add_row(key, num(x, 4), num(y, 4), delta)
    if not d.metrics:
        metrics.add_row("(no metrics recorded)", "", "", "")
    same = "same weights" if d.same_weights else "different weights"
    return Group(Text.assemble((f"{a} vs {b}", "bold"), f"  ({same})"), config, metrics)


def _short(value: Any, limit: int = 60) -> str:
    text = "-" if value is None else (value if isinstance(value, str) else json.dumps(value))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def history_table(name: str, events: list[AliasEventInfo]) -> Table:
    table = Table("when", "alias", "change", "by", title=f"alias history of {name}",
                  title_justify="left")
    for e in events:
        if e.action == "set":
            change = f"{e.previous} -> {e.version}" if e.previous else f"-> {e.version}"
        else:
            change = f"{e.previous} -> (removed)"
        table.add_row(when(e.at), e.alias, change, e.by)
    return table


def console(err: bool = False) -> Console:
    out = Console(stderr=err, highlight=False, soft_wrap=False)
    if not out.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
        out.width = max(out.width, 200)
    return out
