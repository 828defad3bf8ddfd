"""``saereg sae import`` and ``saereg sae convert``: foreign layouts in and out (attached to the
``sae`` group by saereg.commands.main). Only click is imported at module level."""

from __future__ import annotations

from pathlib import Path

import click

from saereg.commands.options import kv_pairs

_FORMATS = ("auto", "saelens", "sparsify", "gemmascope", "dictionary_learning")


@click.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="SAE name to register it under (next version).")
@click.option("--format", "fmt", type=click.Choice(_FORMATS), default="auto", show_default=True,
              help="Layout of PATH.")
@click.option("--model", help="Language model, when the files do not name it.")
@click.option("--hook", help="Hook point, when the files do not name it.")
@click.option("--tag", "tags", multiple=True, callback=kv_pairs, help="KEY=VALUE (repeatable).")
def sae_import(path: Path, name: str, fmt: str, model: str | None, hook: str | None,
               tags: dict[str, str]) -> None:
    """Register an SAE saved by SAELens, sparsify, Gemma Scope (params.npz) or
    dictionary_learning (ae.pt + config.json), converted to this project's layout."""
    from saereg.registry.api import import_sae

    v = import_sae(path, name, fmt=fmt, model=model, hook=hook, tags=tags)
    click.echo(f"imported {path} as {v.ref} ({v.architecture}, d_in={v.d_in}, d_sae={v.d_sae})")


@click.command("convert")
@click.argument("ref")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--to", "to", type=click.Choice(("saelens", "sparsify")), default="saelens",
              show_default=True, help="Layout to write.")
@click.option("--force", is_flag=True, help="Replace DIRECTORY if it exists.")
def sae_convert(ref: str, directory: Path, to: str, force: bool) -> None:
    """Write the SAE REF names (NAME@N, a folder, hf://...) to DIRECTORY in another layout."""
    from saereg.registry.api import convert_sae as convert

    out = convert(ref, directory, to=to, overwrite=force)
    click.echo(f"wrote {ref} as {to} to {out}")
