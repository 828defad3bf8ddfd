"""The root ``saereg`` command: the command tree, and the one place where library errors become
exit codes.

Every command module is imported here directly. Each imports only click and light saereg
modules at module level and the library inside its commands, so ``saereg --help`` loads neither
torch, transformers nor mlflow. Bad parameters exit 2: a :class:`ConfigError` that names a
config field is shown as a usage error naming the option that sets that field (``architecture``
-> ``--arch``). Every other known failure exits 1 with one line. Ctrl-C exits 130: a training
job says where it stopped and how to resume it, anything else says "interrupted".
"""

from __future__ import annotations

import re
import sys

import click

from saereg.commands.cache import cache
from saereg.commands.features import analyze, explain_prompt, feature, label, labels, search
from saereg.commands.formats import sae_convert, sae_import
from saereg.commands.options import command_context, flag_for
from saereg.commands.releases import releases
from saereg.commands.sae import db, gc, sae
from saereg.commands.serve import serve
from saereg.commands.steer import preset, steer
from saereg.commands.study import eval_cmd, neighbors
from saereg.commands.sync import sync
from saereg.commands.train import models, quickstart, train
from saereg.registry.errors import (ConfigError, SaeRegError, TrainingInterrupted, UsageError,
                                    redact)


def option_usage_error(error: ConfigError, ctx: click.Context) -> click.UsageError:
    """A usage error for ``error`` in the words of the command line: the config field it names
    becomes the option that sets it (``architecture must be ...`` -> ``--arch must be ...``)."""
    leaf = command_context(ctx)
    message = redact(error)
    flag = flag_for(leaf.command, error.field) if error.field else None
    if flag is not None:
        named = re.match(rf"{re.escape(error.field)}\b", message)
        message = flag + message[named.end():] if named else f"{flag}: {message}"
    return click.UsageError(message, leaf)


class SaeRegGroup(click.Group):
    """The root group: turns the library's typed errors into click's exit codes."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ConfigError as e:
            raise option_usage_error(e, ctx) from e
        except UsageError as e:
            raise click.UsageError(redact(e), command_context(ctx)) from e
        except SaeRegError as e:
            raise click.ClickException(redact(e)) from e
        except TrainingInterrupted as e:  # the job has recorded where it stopped
            click.echo(redact(e), err=True)  # one line: the job id and how to resume it
            raise click.exceptions.Exit(e.exit_code) from None
        except KeyboardInterrupt:  # click itself would say "Aborted!" and exit 1
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(130) from None


@click.group(cls=SaeRegGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sae-registry")
def cli() -> None:
    """sae-registry: train, keep, study and share sparse autoencoders (SAEs) on
    language-model activations.

    Everything lives under $SAEREG_HOME (default ~/.saereg); MLflow tracking goes to
    $MLFLOW_TRACKING_URI, or a SQLite store there.
    """


sae.add_command(sae_import)  # foreign layouts in and out, beside the catalog commands
sae.add_command(sae_convert)
for command in (models, train, cache, quickstart, sae, db, gc, sync, analyze, feature, label,
                labels, search, explain_prompt, preset, steer, neighbors, eval_cmd, serve,
                releases):
    cli.add_command(command)


def main() -> None:
    try:
        cli(prog_name="saereg")
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # python -m saereg.commands.main (how Lightning's launcher restarts it)
    main()
