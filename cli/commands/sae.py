"""``saereg db ...``, ``saereg sae ...`` and ``saereg gc`` (``sae import`` and ``sae convert``
live in :mod:`.formats`; :mod:`.main` attaches them to the ``sae`` group).

Only click is imported at module level; the catalog (SQLAlchemy), MLflow and torch load when a
command runs.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import click

from saereg.commands.options import kv_pairs
from saereg.registry.errors import UsageError


def _tag_filters(_ctx, _param, values) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        out[key] = value if sep else None
    return out


def _duration(_ctx, _param, value: str) -> float:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([smhd]?)\s*", str(value))
    if not m:
        raise click.BadParameter(f"{value!r} is not a duration (examples: 0, 90s, 30m, 1h, 2d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _echo_warnings(caught) -> None:
    for w in caught:
        click.secho(f"warning: {w.message}", fg="yellow", err=True)


# -- saereg db ---------------------------------------------------------------------------------

@click.group()
def db() -> None:
    """The catalog database: schema migrations (SAEREG_DATABASE_URL or $SAEREG_HOME/catalog.db)."""


def _engine():
    from saereg.registry.catalog import db as catalog_db

    return catalog_db.get_engine(check_schema=False)


class _StepsCommand(click.Command):
    """Reads ``-1``, ``-2``, ... as the REVISION argument (a number of steps), not as options."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" not in args:
            steps = [a for a in args if re.fullmatch(r"-\d+", a)]
            args = [a for a in args if a not in steps] + (["--", *steps] if steps else [])
        return super().parse_args(ctx, args)


@db.command("upgrade", cls=_StepsCommand)
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Migrate the catalog up to REVISION: a revision id (or a unique prefix of one, e.g.
    0003), head (the default), or +N for N steps up. `saereg db history` lists them."""
    from saereg.registry.catalog import db as catalog_db
    from saereg.registry.catalog import migrate

    engine = _engine()
    before = migrate.current_revision(engine)
    migrate.upgrade_engine(engine, revision)
    after = migrate.current_revision(engine)
    click.echo(f"{catalog_db.safe_url(str(engine.url))}: {before or 'empty'} -> {after}")


@db.command("downgrade", cls=_StepsCommand)
@click.argument("revision", default="-1")
@click.option("--yes", "-y", is_flag=True,
              help="Drop without asking (needed when there is no terminal to ask on).")
def db_downgrade(revision: str, yes: bool) -> None:
    """Migrate the catalog down to REVISION: -N for N steps down (the default is -1, one
    step; `saereg db downgrade -2` works as written), a revision id, or base (removes the whole
    catalog).

    First lists the tables and columns the steps drop, with their row counts, and asks; --yes
    skips the question. Without a terminal and without --yes nothing is changed."""
    from saereg.registry.catalog import db as catalog_db
    from saereg.registry.catalog import migrate
    from saereg.registry.errors import ConfirmationRequiredError

    engine = _engine()
    where = catalog_db.safe_url(str(engine.url))
    plan = migrate.plan_downgrade(engine, revision)
    if not plan.steps:
        click.echo(f"{where}: already at {plan.current}; nothing to downgrade")
        return
    change = f"{plan.current} -> {plan.target or 'base (empty)'}"
    if not yes and not _interactive():
        raise ConfirmationRequiredError(
            f"refusing to downgrade {where} ({change}) without confirmation: it "
            f"{plan.summary()}; pass --yes to proceed")
    click.echo(f"{where}: downgrade {change} {plan.summary()}"
               if not plan.drops else f"{where}: downgrade {change} drops:")
    for drop in plan.drops:
        click.echo(f"  {drop}")
    if not yes:
        click.confirm(f"Downgrade, dropping {plan.rows} row{'s' * (plan.rows != 1)} in all?",
                      abort=True)
    migrate.downgrade_engine(engine, plan.target or "base")
    after = migrate.current_revision(engine)
    click.echo(f"{where}: {plan.current} -> {after or 'empty'}")


def _interactive() -> bool:
    """Whether there is a person at a terminal to answer a question."""
    import sys

    return sys.stdin.isatty()


@db.command("current")
def db_current() -> None:
    """Show the catalog's schema revision."""
    from saereg.registry.catalog import db as catalog_db
    from saereg.registry.catalog import migrate

    engine = _engine()
    current, head = migrate.current_revision(engine), migrate.head_revision()
    state = "head" if current == head else f"head is {head}; run `saereg db upgrade`"
    click.echo(f"{catalog_db.safe_url(str(engine.url))}: {current or 'empty'} ({state})")


@db.command("history")
def db_history() -> None:
    """List the schema revisions, oldest first."""
    from saereg.registry.catalog import migrate

    current = migrate.current_revision(_engine())
    for rev in migrate.history(current):
        marks = ", ".join(m for m, on in (("head", rev.is_head), ("current", rev.is_current)) if on)
        click.echo(f"{rev.down_revision or 'base'} -> {rev.revision}"
                   f"{f' ({marks})' if marks else ''}: {rev.doc}")


# -- saereg sae --------------------------------------------------------------------------------

@click.group()
def sae() -> None:
    """Named SAEs: register versions, list, show, diff, aliases, deprecate, export.

    References: NAME (latest), NAME@3 (version), NAME@prod (alias).
    """


@sae.command("register")
@click.argument("path", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--run", "run_id", help="MLflow run id of a training run (its `sae/` artifact).")
@click.option("--name", required=True, help="SAE name; the version number is allocated.")
@click.option("--model", help="Language model, when cfg.json does not name it.")
@click.option("--hook", help="Hook point, when cfg.json does not name it.")
@click.option("--tag", "tags", multiple=True, callback=kv_pairs, help="KEY=VALUE (repeatable).")
@click.option("--note", help="A first note on the version.")
@click.option("--parent", help="The version this one derives from (NAME@N).")
def sae_register(path, run_id, name, model, hook, tags, note, parent) -> None:
    """Register PATH (an SAE folder: this project's or SAELens's) or --run RUN_ID as the next
    version of --name, mirrored to the MLflow Model Registry."""
    from saereg.registry.catalog.writes import Catalog

    if (path is None) == (run_id is None):
        raise UsageError("give either an SAE folder PATH or --run RUN_ID (exactly one)")
    cat = Catalog()
    if run_id and (model or hook):
        raise UsageError("--model and --hook apply to folders; a run names its own")
    with warnings.catch_warnings(record=True) as caught:  # assumptions made, metrics dropped
        warnings.simplefilter("always")
        if run_id:
            v = cat.register_run(run_id, name, tags=tags, note=note, parent=parent)
        else:
            v = cat.register_folder(path, name, model=model, hook=hook, tags=tags, note=note,
                                    parent=parent)
    _echo_warnings(caught)
    total = sum(f.size for f in v.files)
    click.echo(f"registered {v.ref} ({v.model} {v.hook}, {v.architecture}, d_sae {v.d_sae}; "
               f"{len(v.files)} files, {total:,} bytes; MLflow model version "
               f"{v.name}/{v.mlflow_model_version})")


@sae.command("list")
@click.option("--model", help="Language model (globs with * allowed).")
@click.option("--hook", help="Hook point (globs with * allowed).")
@click.option("--arch", "architecture", help="Architecture: relu, topk, batchtopk, jumprelu, ...")
@click.option("--name", help="SAE name (globs with * allowed).")
@click.option("--tag", "tags", multiple=True, callback=_tag_filters,
              help="KEY=VALUE or KEY (repeatable; all must match).")
@click.option("--latest", is_flag=True, help="Only the newest version of each SAE.")
@click.option("--hide-deprecated", is_flag=True, help="Leave deprecated versions out.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def sae_list(model, hook, architecture, name, tags, latest, hide_deprecated, as_json) -> None:
    """List versions with their key metrics (EV, L0, CE-loss score, dead fraction)."""
    from saereg.commands.catalog_views import console, versions_table
    from saereg.registry.catalog.writes import Catalog

    rows = Catalog().list(model=model, hook=hook, architecture=architecture, name=name,
                          tags=tags, latest=latest, include_deprecated=not hide_deprecated)
    if as_json:
        for r in rows:
            click.echo(json.dumps({"ref": r.ref, "name": r.name, "version": r.number,
                                   "aliases": r.aliases, "model": r.model, "hook": r.hook,
                                   "architecture": r.architecture, "d_sae": r.d_sae,
                                   "explained_variance": r.explained_variance, "l0": r.l0,
                                   "ce_loss_score": r.ce_loss_score,
                                   "dead_fraction": r.dead_fraction, "status": r.status,
                                   "created_at": str(r.created_at)}))
        return
    console().print(versions_table(rows))


@sae.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Everything as one JSON object.")
def sae_show(ref: str, as_json: bool) -> None:
    """Config, metrics, lineage (run, dataset, tokens, parent), aliases and files of REF."""
    from saereg.commands.catalog_views import console, show_version, version_json
    from saereg.registry.catalog.writes import Catalog

    v = Catalog().get(ref)
    if as_json:
        click.echo(json.dumps(version_json(v), indent=2, default=str))
    else:
        console().print(show_version(v))


@sae.command("diff")
@click.argument("ref1")
@click.argument("ref2")
def sae_diff(ref1: str, ref2: str) -> None:
    """Config and lineage differences, and every metric side by side, of two versions."""
    from saereg.commands.catalog_views import console, diff_table
    from saereg.registry.catalog.writes import Catalog

    console().print(diff_table(Catalog().diff(ref1, ref2)))


@sae.group("alias")
def sae_alias() -> None:
    """Movable names for versions (prod, staging, ...), mirrored to MLflow."""


@sae_alias.command("set")
@click.argument("name")
@click.argument("alias")
@click.argument("version")
def alias_set(name: str, alias: str, version: str) -> None:
    """Point ALIAS of SAE NAME at VERSION (a number, another alias, or latest)."""
    from saereg.registry.catalog.writes import Catalog

    v = Catalog().set_alias(name, alias, version)
    click.echo(f"{name}@{alias} -> {v.ref}")


@sae_alias.command("unset")
@click.argument("name")
@click.argument("alias")
def alias_unset(name: str, alias: str) -> None:
    """Remove ALIAS of SAE NAME (the history keeps it)."""
    from saereg.registry.catalog.writes import Catalog

    number = Catalog().unset_alias(name, alias)
    click.echo(f"removed {name}@{alias} (was version {number})")


@sae_alias.command("history")
@click.argument("name")
def alias_history(name: str) -> None:
    """Every alias change of SAE NAME, oldest first."""
    from saereg.commands.catalog_views import console, history_table
    from saereg.registry.catalog.writes import Catalog

    console().print(history_table(name, Catalog().alias_history(name)))


@sae.command("deprecate")
@click.argument("ref")
@click.option("--reason", required=True, help="Why, and what to use instead.")
def sae_deprecate(ref: str, reason: str) -> None:
    """Mark REF deprecated: it stays loadable (with a warning) and is never deleted."""
    from saereg.registry.catalog.writes import Catalog

    v = Catalog().deprecate(ref, reason)
    click.echo(f"deprecated {v.ref}: {reason}")


@sae.command("tag")
@click.argument("ref")
@click.argument("tags", nargs=-1, required=True, callback=kv_pairs)
def sae_tag(ref: str, tags: dict[str, str]) -> None:
    """Set KEY=VALUE tags on REF (catalog and MLflow model version)."""
    from saereg.registry.catalog.writes import Catalog

    v = Catalog().tag(ref, tags)
    click.echo(f"{v.ref}: " + ", ".join(f"{k}={x}" for k, x in v.tags.items()))


@sae.command("note")
@click.argument("ref")
@click.argument("text")
def sae_note(ref: str, text: str) -> None:
    """Append a note to REF."""
    from saereg.registry.catalog.writes import Catalog

    v = Catalog().add_note(ref, text)
    click.echo(f"{v.ref}: {len(v.notes)} note{'s' * (len(v.notes) != 1)}")


@sae.command("export")
@click.argument("ref")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace DIRECTORY if it exists.")
def sae_export(ref: str, directory: Path, force: bool) -> None:
    """Write REF's files (checksum-verified, SAELens layout) to DIRECTORY."""
    from saereg.registry.api import export_sae

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = export_sae(ref, directory, overwrite=force)
    _echo_warnings(caught)
    click.echo(f"exported {ref} to {out}")


# -- saereg gc ---------------------------------------------------------------------------------

@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--min-age", default="1h", callback=_duration, show_default=True,
              help="Leave anything younger alone (registrations in flight): 0, 30m, 1h, 2d.")
@click.option("--no-mlflow", is_flag=True, help="Do not look for stray MLflow model versions.")
def gc(dry_run: bool, min_age: float, no_mlflow: bool) -> None:
    """Remove stored files that no version references, leftover temporary files, and MLflow
    model versions whose catalog version never committed."""
    from saereg.registry.api import gc as collect

    report = collect(dry_run=dry_run, min_age=min_age, mlflow=not no_mlflow)
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{report.store}: {verb} {len(report.blobs)} blob(s), {len(report.trees)} "
               f"tree(s), {len(report.temporary)} temporary file(s), "
               f"{len(report.mlflow_versions)} MLflow model version(s)")
    for sha in report.blobs:
        click.echo(f"  blob {sha}")
    for name, version in report.mlflow_versions:
        click.echo(f"  MLflow {name}/{version}")
    if report.mlflow_error:
        click.secho(f"warning: {report.mlflow_error}", fg="yellow", err=True)
