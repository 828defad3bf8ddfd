"""`saereg neighbors` and `saereg eval`; the library is imported inside each command."""

from __future__ import annotations

import click


@click.command()
@click.argument("ref")
@click.argument("index", type=int)
@click.option("--in", "other", default=None, help="Another version on the same model and hook.")
@click.option("-k", default=10, show_default=True, type=int)
def neighbors(ref, index, other, k):
    """The features nearest to INDEX of REF by decoder cosine (stored once computed)."""
    from saereg.analysis.neighbors import neighbors as find

    for n in find(ref, index, other=other, k=k):
        click.echo(f"{n.ref}\t{n.index}\t{n.cosine:+.4f}\t{n.label or ''}")


@click.command("eval")
@click.argument("ref")
@click.option("--dataset", default=None)
@click.option("--tokens", default=8192, show_default=True, type=int)
@click.option("--context-size", default=128, show_default=True, type=int)
@click.option("--no-mlflow", is_flag=True, help="Store in the catalog only.")
def eval_cmd(ref, dataset, tokens, context_size, no_mlflow):
    """Evaluate REF on held-out text; store the result on the version and in MLflow."""
    from saereg.analysis.neighbors import evaluate

    out = evaluate(ref, dataset=dataset, tokens=tokens, context_size=context_size,
                   mlflow=not no_mlflow)
    for key, value in out.items():
        click.echo(f"{key}\t{value}")
