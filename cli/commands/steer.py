"""`saereg preset` and `saereg steer`; the library is imported inside each command.

Each numeric option is a :class:`~saereg.commands.options.FieldOption` naming the library
argument it sets, so that a value the library refuses (a NaN or infinite ``--strength`` or
``--temperature``) exits 2 naming the option.
"""

from __future__ import annotations

import textwrap

import click

from saereg.commands.options import FieldOption


def _setting(flag: str, field: str, type_, help_: str | None = None):
    """An option that sets the library argument or generation setting ``field``."""
    return click.option(flag, field, cls=FieldOption, field=field, type=type_, default=None,
                        help=help_)


def _feature(text: str) -> tuple[str | None, int, float | None]:
    """``INDEX`` or ``REF:INDEX``."""
    ref, _, index = text.rpartition(":")
    try:
        return (ref or None), int(index), None
    except ValueError:
        raise click.BadParameter(f"expected INDEX or REF:INDEX, got {text!r}") from None


@click.group()
def preset():
    """Steering presets: features with strengths, a method and generation defaults."""


@preset.command("create")
@click.argument("name")
@click.option("--sae", "ref", default=None, help="SAE version the features belong to.")
@click.option("--feature", "features", multiple=True, help="INDEX or REF:INDEX (repeatable).")
@click.option("--strength", "strengths", multiple=True, type=float, cls=FieldOption,
              field="strength", help="One per --feature, or one for all (a finite number; "
              "default 8).")
@click.option("--method", type=click.Choice(["add", "clamp"]), default=None)
@_setting("--max-new-tokens", "max_new_tokens", int)
@_setting("--temperature", "temperature", float, "Sampling temperature (finite, >= 0; 0 is "
          "greedy).")
@_setting("--top-k", "top_k", int)
@_setting("--seed", "seed", int)
def preset_create(name, ref, features, strengths, method, max_new_tokens, temperature, top_k,
                  seed):
    """Create preset NAME, or its next version (edit) when it exists."""
    from saereg.analysis.steering import create_preset
    from saereg.registry.errors import UsageError

    if features and len(strengths) not in (0, 1, len(features)):
        raise UsageError("give one --strength, or one per --feature")
    feats = [(r, i, strengths[min(n, len(strengths) - 1)] if strengths else 8.0)
             for n, (r, i, _) in enumerate(map(_feature, features))]
    p = create_preset(name, ref, feats, method=method, generation={
        "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
        "seed": seed})
    click.echo(f"preset {p.name}@{p.number} on {p.ref} ({p.method}, {len(p.features)} features)")


@preset.command("show")
@click.argument("name")
def preset_show(name):
    """A preset version (NAME or NAME@N) as JSON."""
    import json

    from saereg.analysis.steering import get_preset

    p = get_preset(name)
    click.echo(json.dumps({"name": p.name, "version": p.number, "sae": p.ref, "model": p.model,
                           "method": p.method, "features": p.features,
                           "generation": p.generation, "created_by": p.created_by}, indent=2))


@click.command()
@click.argument("prompt")
@click.option("--preset", "preset_ref", required=True, help="NAME or NAME@N.")
@_setting("--seed", "seed", int)
@_setting("--max-new-tokens", "max_new_tokens", int)
def steer(prompt, preset_ref, seed, max_new_tokens):
    """Print the default and the steered continuation of PROMPT side by side (same seed)."""
    from saereg.analysis.steering import steer as run

    r = run(preset_ref, prompt, seed=seed, generation={"max_new_tokens": max_new_tokens})
    width = 38
    left = textwrap.wrap(prompt + r.default, width) or [""]
    right = textwrap.wrap(prompt + r.steered, width) or [""]
    click.echo(f"{'default':<{width}} | steered ({r.preset}, seed {r.seed})")
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        click.echo(f"{a:<{width}} | {b}")
    click.echo(f"stored as steering run {r.run_id}")
