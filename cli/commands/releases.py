"""``saereg releases``: the published SAEs SAELens's release table names, one line each (the
table is read as data; nothing is downloaded). Only click is imported at module level."""

from __future__ import annotations

import click


@click.command("releases")
@click.option("--model", default=None, help="Only releases of this model (a substring).")
@click.option("--search", "word", default=None,
              help="Only releases whose name, repo or model, or SAEs whose id, hold this word.")
@click.option("--table", default=None, envvar="SAEREG_RELEASES",
              help="A pretrained_saes.yaml (or its folder) to read instead of sae-lens's.")
def releases(model: str | None, word: str | None, table: str | None) -> None:
    """List the SAEs that the installed sae-lens names by release: release, SAE id, Hub repo,
    model, hook, width, L0 where given, and the layout (those marked "not pulled" are layouts
    this project does not convert). Pull one with
    `saereg sync pull --release RELEASE --sae-id ID` (or load saelens://RELEASE/ID)."""
    from saereg.registry.hub import releases as rel

    found = rel.search(rel.load_table(table), model=model, word=word)
    click.echo("\t".join(("release", "sae_id", "repo", "model", "hook", "width", "l0",
                          "layout")))
    count = 0
    for r in found:
        for e in r.saes:
            kind = rel.layout(e)
            width = rel.width(r, e)
            click.echo("\t".join((r.name, e.id, r.repo, r.model, rel.hook(r, e) or "-",
                                  str(width) if width else "-",
                                  f"{e.l0:g}" if e.l0 else "-",
                                  kind if kind in rel.SUPPORTED else f"{kind} (not pulled)")))
            count += 1
    click.echo(f"{count} SAEs in {len(found)} releases", err=True)
