"""``saereg cache``: harvest activations once into an on-disk cache (see saereg.training.cache);
``saereg cache import``: make such a cache from a tensor file (saereg.training.cache_import).

The harvest options come from :class:`saereg.training.cache_config.CacheConfig`. ``cache`` stays one
command (``saereg cache MODEL ...``) that hands ``saereg cache import ...`` to its one
sub-command. Only click and light saereg modules are imported at module level; torch and
transformers load when a command runs.
"""

from __future__ import annotations

import click

from saereg.commands.options import _CONTEXT_KEY, Count, Opt, config_options
from saereg.training.cache_config import CacheConfig


@click.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--hook", "hooks", multiple=True, metavar="HOOK|KEY=HOOK",
              help="A hook of the cache: KEY=HOOK stores the file's tensor KEY as HOOK, a plain "
                   "NAME the tensor NAME as hook NAME; a file of one tensor takes one --hook "
                   "HOOK. Repeat for several hooks.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="The cache folder to create (must not exist, or be empty).")
@click.option("--model", default=None,
              help="The model the activations came from, recorded for the SAEs trained on them "
                   "[default: unknown].")
@click.option("--shard-tokens", type=Count(minimum=1), default="65536", show_default=True,
              help="Rows per shard file.")
@click.option("--heldout-tokens", type=Count(minimum=0), default="8192", show_default=True,
              help="The last rows kept for evaluation, never trained on (at most a tenth of "
                   "the rows; 0 for none).")
@click.option("--mixed-widths", is_flag=True,
              help="Take hooks of different widths (an MLP's hidden layer beside the residual "
                   "stream); without it every hook must have the first one's width.")
@click.option("--no-progress", is_flag=True, help="No progress line.")
def cache_import(file: str, hooks: tuple[str, ...], out: str, model: str | None,
                 shard_tokens: int, heldout_tokens: int, mixed_widths: bool,
                 no_progress: bool) -> None:
    """Make an activation cache from FILE (.safetensors, .npy or .pt): each [rows, width]
    tensor of it becomes the activations of one --hook, so that `saereg train --from-cache OUT`
    trains on them and evaluates on the held-out rows. Nothing is unpickled (.pt loads with
    weights_only); no tokenizer, context size or BOS handling is recorded, since none applied.

    \b
        saereg cache import acts.npy --hook blocks.6.hook_resid_post --out ./acts --model gpt2
        saereg cache import acts.safetensors --hook l6=model.layers.6 \\
            --hook l12=model.layers.12 --out ./acts
    """
    from saereg.training.cache_import import import_cache

    click.get_current_context().meta[_CONTEXT_KEY] = click.get_current_context()
    m = import_cache(file, hooks, out, model=model, shard_tokens=shard_tokens,
                     heldout_tokens=heldout_tokens, mixed_widths=mixed_widths,
                     progress=not no_progress)
    held = m["heldout"]["tokens"] if m["heldout"] else 0
    click.echo(f"cache {out}: {m['tokens']} rows x {len(m['hooks'])} hook(s) in "
               f"{len(m['shards'])} shard(s), {held} held-out rows; train with: saereg train "
               f"--from-cache {out} --hook {m['hooks'][0]}")


class CacheCommand(click.Command):
    """``saereg cache MODEL ...``, and ``saereg cache import ...`` handed to its sub-command."""

    commands = {"import": cache_import}

    def make_context(self, info_name, args, parent=None, **extra):
        if args and args[0] in self.commands:
            # the parent in usage lines: "saereg cache import", without cache's MODEL
            here = click.Context(click.Command(self.name), info_name=info_name, parent=parent)
            return self.commands[args[0]].make_context(args[0], list(args[1:]), parent=here,
                                                       **extra)
        return super().make_context(info_name, args, parent=parent, **extra)

    def format_help(self, ctx, formatter):
        super().format_help(ctx, formatter)
        with formatter.section("Commands"):
            formatter.write_dl([(name, cmd.get_short_help_str(60))
                                for name, cmd in self.commands.items()])

CACHE_OPTIONS = {
    "model": None,  # the MODEL argument
    "hooks": Opt(flag="--hook", multiple=True),
    "out": Opt(type=click.Path(file_okay=False)),
    "tokens": Opt(count=True),
    "shard_tokens": Opt(count=True),
    "heldout_tokens": Opt(count=True),
}


@click.command(cls=CacheCommand)
@click.argument("model")
@config_options(CacheConfig, table=CACHE_OPTIONS)
@click.option("--no-progress", is_flag=True, help="No progress line.")
def cache(model: str, no_progress: bool, **options) -> None:
    """Run MODEL once over the dataset and store the activations of every --hook, with their
    token ids and provenance, so that `saereg train --from-cache OUT` trains without the model.

        saereg cache smollm2-135m --hook 6 --hook 15 --tokens 2M --out ./acts

    Activations from elsewhere (a tensor file): saereg cache import --help
    """
    from saereg.registry.errors import ConfigError
    from saereg.registry.sae.modules import torch_dtype as resolve_dtype
    from saereg.training.cache import write_cache
    from saereg.training.config import LM_DTYPES
    from saereg.training.job import check_dataset, resolve_device
    from saereg.training.lm import load_lm

    cfg = CacheConfig(model=model, **options)
    torch_dtype = resolve_dtype(cfg.dtype, LM_DTYPES)
    check_dataset(cfg)
    lm = load_lm(cfg.model, device=resolve_device(cfg.device), dtype=torch_dtype)
    if cfg.context_size > lm.context_limit:
        raise ConfigError(f"context_size {cfg.context_size} exceeds the model's limit "
                          f"({lm.context_limit})", field="context_size")
    manifest = write_cache(lm, cfg.hooks, cfg.out, cfg.tokens, dataset=cfg.dataset,
                           text_column=cfg.text_column, context_size=cfg.context_size,
                           lm_batch_size=cfg.lm_batch_size, shard_tokens=cfg.shard_tokens,
                           heldout_tokens=cfg.heldout_tokens, progress=not no_progress)
    out = cfg.out
    click.echo(f"cache {out}: {manifest['tokens']} tokens x {len(manifest['hooks'])} hook(s) in "
               f"{len(manifest['shards'])} shard(s); train with: saereg train --from-cache {out} "
               f"--hook {manifest['hooks'][0]}")
