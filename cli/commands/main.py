"""The root ``saereg`` command.

Sub-commands live next to the code they drive (training/cli.py, ...) and are imported only when
invoked, so ``saereg --help`` loads neither torch, transformers nor mlflow. Library errors become
exit codes here: bad parameters exit 2, every other known failure exits 1 with one line.
"""

from __future__ import annotations

import importlib
import sys

import click

from saereg.registry.errors import SaeRegError, UsageError

LAZY_COMMANDS = {
    "models": ("saereg.commands.train", "models", "Language models: list hook points and their shapes."),
    "train": ("saereg.commands.train", "train", "Train SAEs on one or more hook points from one model pass."),
    "cache": ("saereg.commands.cache", "cache",
              "Store a model's activations at hook points once, to train from them later."),
    "quickstart": ("saereg.commands.train", "quickstart",
                   "Train a TopK SAE on the packaged SmolLM2, offline, in about ten minutes."),
    "sae": ("saereg.commands.sae", "sae",
            "Named SAEs: register versions, list, show, diff, aliases, deprecate, export."),
    "db": ("saereg.commands.sae", "db", "The catalog database: schema migrations."),
    "sync": ("saereg.commands.sync", "sync",
             "Hugging Face Hub: push versions to a repo, pull published SAEs into the catalog."),
    "analyze": ("saereg.commands.features", "analyze",
                "Study every feature of an SAE version in one pass over text (a stats run)."),
    "feature": ("saereg.commands.features", "feature", "One feature's dashboard: labels, stats, examples."),
    "label": ("saereg.commands.features", "label", "Label features (history kept); heuristic labeller."),
    "search": ("saereg.commands.features", "search", "Search feature labels, with filters."),
    "explain-prompt": ("saereg.commands.features", "explain_prompt",
                       "The top features on each token of a prompt, with labels."),
    "preset": ("saereg.commands.steer", "preset", "Steering presets: versioned data."),
    "steer": ("saereg.commands.steer", "steer",
              "Default and steered continuations of a prompt, side by side (stored)."),
    "neighbors": ("saereg.commands.study", "neighbors",
                  "Nearest features by decoder cosine, within or across versions."),
    "eval": ("saereg.commands.study", "eval_cmd",
             "Evaluate a version on held-out text; store it and log it to MLflow."),
    "gc": ("saereg.commands.sae", "gc",
           "Remove stored files and MLflow versions that no catalog version references."),
}


def kv_pairs(_ctx, _param, values) -> dict[str, str]:
    """Click callback: repeated KEY=VALUE options -> a dict."""
    out = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        out[key] = value
    return out


class LazyGroup(click.Group):
    """A group whose commands are imported on first use."""

    def __init__(self, *args, lazy: dict[str, tuple[str, str, str]], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str):
        if name in self.lazy and name not in self.commands:
            module, attr, _ = self.lazy[name]
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, self.lazy[name][2] if name in self.lazy and name not in self.commands
                 else self.commands[name].get_short_help_str(limit=80))
                for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UsageError as e:
            raise click.UsageError(str(e), ctx) from e
        except SaeRegError as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=LazyGroup, lazy=LAZY_COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sae-registry")
def cli() -> None:
    """sae-registry: train, keep, study and share sparse autoencoders (SAEs) on
    language-model activations.

    Everything lives under $SAEREG_HOME (default ~/.saereg); MLflow tracking goes to
    $MLFLOW_TRACKING_URI, or a SQLite store there.
    """


def main() -> None:
    try:
        cli(prog_name="saereg")
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # python -m saereg.commands.main (how Lightning's launcher restarts it)
    main()
