"""``saereg cache``: harvest activations once into an on-disk cache (see saereg.training.cache).

The options come from :class:`saereg.training.config.CacheConfig`. Only click and light saereg
modules are imported at module level; torch and transformers load when the command runs.
"""

from __future__ import annotations

import click

from saereg.commands.options import Opt, config_options
from saereg.training.config import CacheConfig

CACHE_OPTIONS = {
    "model": None,  # the MODEL argument
    "hooks": Opt(flag="--hook", multiple=True),
    "out": Opt(type=click.Path(file_okay=False)),
    "tokens": Opt(count=True),
    "shard_tokens": Opt(count=True),
    "heldout_tokens": Opt(count=True),
}


@click.command()
@click.argument("model")
@config_options(CacheConfig, table=CACHE_OPTIONS)
@click.option("--no-progress", is_flag=True, help="No progress line.")
def cache(model: str, no_progress: bool, **options) -> None:
    """Run MODEL once over the dataset and store the activations of every --hook, with their
    token ids and provenance, so that `saereg train --from-cache OUT` trains without the model.

        saereg cache smollm2-135m --hook 6 --hook 15 --tokens 2M --out ./acts
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
