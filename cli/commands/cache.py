"""``saereg cache``: harvest activations once into an on-disk cache (see saereg.training.cache).

Only click is imported at module level; torch and transformers load when the command runs.
"""

from __future__ import annotations

import click

from saereg.commands.train import Count


@click.command()
@click.argument("model")
@click.option("--hook", "hooks", multiple=True, required=True,
              help="Hook point (module path or layer number); repeat for several.")
@click.option("--tokens", type=Count(), required=True, help="Activations to store per hook.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Cache folder (created; an incomplete cache there is resumed).")
@click.option("--dataset", default=None, help="Hub dataset or local txt/jsonl/parquet path (default: offline corpus).")
@click.option("--text-column", default=None, help="Column holding the text.")
@click.option("--context-size", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--lm-batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--shard-tokens", type=Count(), default="64k", show_default=True,
              help="Activations per shard file.")
@click.option("--heldout-tokens", type=Count(minimum=0), default="8192", show_default=True,
              help="Held-out activations stored for evaluation without the model.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="float32", show_default=True, help="Model dtype.")
@click.option("--no-progress", is_flag=True, help="No progress line.")
def cache(model, hooks, tokens, out, dataset, text_column, context_size, lm_batch_size,
          shard_tokens, heldout_tokens, device, dtype, no_progress) -> None:
    """Run MODEL once over the dataset and store the activations of every --hook, with their
    token ids and provenance, so that `saereg train --from-cache OUT` trains without the model.

        saereg cache smollm2-135m --hook 6 --hook 15 --tokens 2M --out ./acts
    """
    import torch

    from saereg.registry.errors import ConfigError
    from saereg.training.cache import write_cache
    from saereg.training.job import check_dataset, resolve_device
    from saereg.training.lm import load_lm

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ConfigError(f"--dtype must be float32, bfloat16 or float16; got {dtype!r}")
    from types import SimpleNamespace

    check_dataset(SimpleNamespace(dataset=dataset, text_column=text_column))
    lm = load_lm(model, device=resolve_device(device), dtype=torch_dtype)
    if context_size > lm.context_limit:
        raise ConfigError(f"--context-size {context_size} exceeds the model's limit "
                          f"({lm.context_limit})")
    manifest = write_cache(lm, list(hooks), out, tokens, dataset=dataset, text_column=text_column,
                           context_size=context_size, lm_batch_size=lm_batch_size,
                           shard_tokens=shard_tokens, heldout_tokens=heldout_tokens,
                           progress=not no_progress)
    click.echo(f"cache {out}: {manifest['tokens']} tokens x {len(manifest['hooks'])} hook(s) in "
               f"{len(manifest['shards'])} shard(s); train with: saereg train --from-cache {out} "
               f"--hook {manifest['hooks'][0]}")
