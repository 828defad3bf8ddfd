"""Commands for studying features: analyze, feature show and plot, label, search and
explain-prompt; heavy imports happen inside the commands."""

from __future__ import annotations

import click

from saereg.commands.feature_views import render_feature


@click.command()
@click.argument("ref")
@click.option("--dataset", default=None, help="Dataset (hub name or local files); default: the "
              "offline default corpus.")
@click.option("--tokens", default=65536, show_default=True, type=int, help="Tokens to read.")
@click.option("--context-size", default=128, show_default=True, type=int)
@click.option("--batch-size", default=8, show_default=True, type=int)
def analyze(ref, dataset, tokens, context_size, batch_size):
    """Study every feature of REF in one pass over text; store it as a new stats run."""
    from saereg.analysis.stats import AnalyzeConfig
    from saereg.analysis.stats import analyze as run

    cfg = AnalyzeConfig(dataset=dataset, tokens=tokens, context_size=context_size,
                        batch_size=batch_size)
    run_id = run(ref, cfg)
    click.echo(f"stats run {run_id} stored for {ref}")


@click.group()
def feature():
    """One feature of an SAE version: its dashboard."""


@feature.command("show")
@click.argument("ref")
@click.argument("index", type=int)
@click.option("--run", "run_id", type=int, default=None, help="Stats run id (default: latest).")
@click.option("--examples", default=5, show_default=True, type=int)
def feature_show(ref, index, run_id, examples):
    """Labels, statistics, histogram, top examples and top logits of feature INDEX."""
    from saereg.analysis.labels import history
    from saereg.analysis.stats import feature_stats

    info, run, stats = feature_stats(ref, index, run_id=run_id)
    click.echo(render_feature(info, index, run, stats, history(ref, index), examples))


@feature.command("plot")
@click.argument("ref")
@click.argument("index", type=int)
@click.option("--out", "out", default=None, help="PNG path (default: REF-INDEX.png here).")
@click.option("--run", "run_id", type=int, default=None, help="Stats run id (default: latest).")
def feature_plot(ref, index, out, run_id):
    """Write a PNG of feature INDEX: histogram and top examples."""
    from saereg.analysis.labels import history
    from saereg.analysis.plot import plot_feature
    from saereg.analysis.stats import feature_stats
    from saereg.registry.errors import UsageError

    info, run, stats = feature_stats(ref, index, run_id=run_id)
    if stats is None:
        raise UsageError(f"no statistics yet: run `saereg analyze {info.ref}`")
    path = plot_feature(info, index, run, stats, history(ref, index),
                        out or f"{info.name}-{info.number}-{index}.png")
    click.echo(f"wrote {path}")


@click.command()
@click.argument("ref")
@click.argument("index", type=int, required=False)
@click.argument("text", required=False)
@click.option("--status", default="candidate", show_default=True,
              type=click.Choice(["candidate", "accepted", "rejected"]))
@click.option("--heuristic", is_flag=True, help="Label every live feature of REF offline from "
              "its latest stats run (top tokens and logits).")
@click.option("--llm", is_flag=True, help="Label INDEX (or every live feature) with the LLM at "
              "SAEREG_LLM_URL / SAEREG_LLM_MODEL, with a detection score.")
@click.option("--set-status", "set_id", type=int, default=None,
              help="Change the status of label ID to --status instead of adding one.")
@click.option("--history", "show_history", is_flag=True, help="List every label of INDEX.")
def label(ref, index, text, status, heuristic, llm, set_id, show_history):
    """Add a label to feature INDEX of REF (relabelling appends; history is kept)."""
    from saereg.analysis import labels
    from saereg.registry.errors import UsageError

    if heuristic:
        made = labels.label_heuristic(ref, progress=True)
        click.echo(f"{len(made)} heuristic labels added to {ref}")
        return
    if llm:
        from saereg.analysis.explainer import label_llm
        from saereg.analysis.stats import feature_stats

        if index is not None:
            indices = [index]
        else:
            info = feature_stats(ref, 0)[0]
            indices = list(range(info.d_sae))
        for lab in label_llm(ref, indices):
            score = "-" if lab.detection_score is None else f"{lab.detection_score:.2f}"
            click.echo(f"{lab.feature_index}\t{score}\t{lab.text}")
        return
    if set_id is not None:
        lab = labels.set_status(set_id, status)
        click.echo(f"label {lab.id} is now {lab.status}")
        return
    if index is None:
        raise UsageError("give INDEX (and TEXT), or --heuristic")
    if show_history or text is None:
        for lab in labels.history(ref, index):
            sup = f" supersedes {lab.supersedes}" if lab.supersedes else ""
            click.echo(f"{lab.id}\t{lab.created_at:%Y-%m-%d %H:%M}\t{lab.method}"
                       f"{'/' + lab.model if lab.model else ''}\t{lab.status}\t{lab.author}\t"
                       f"{lab.text}{sup}")
        return
    lab = labels.add_label(ref, index, text, status=status)
    click.echo(f"label {lab.id} added to {ref} feature {index}"
               + (f" (supersedes {lab.supersedes})" if lab.supersedes else ""))


@click.command()
@click.argument("query")
@click.option("--meaning", is_flag=True, help="Rank by meaning (cosine of sentence embeddings) "
              "instead of matching words.")
@click.option("--hybrid", is_flag=True, help="Fuse the word and meaning ranks (reciprocal rank "
              "fusion).")
@click.option("--model", default=None)
@click.option("--hook", default=None)
@click.option("--sae", default=None, help="SAE name.")
@click.option("--min-rate", type=float, default=None, help="Lowest firing rate (0..1).")
@click.option("--max-rate", type=float, default=None, help="Highest firing rate (0..1).")
@click.option("--limit", default=20, show_default=True, type=int,
              help="Features listed (per SAE version when grouped).")
def search(query, meaning, hybrid, model, hook, sae, min_rate, max_rate, limit):
    """Search feature labels (every word must match), best first; or by meaning.

    Every label a feature has had is searched (rejected ones never), and each feature is listed
    once, with its current label, the one `saereg feature show` shows, even when the query
    matched an older label that the current one superseded.

    With --meaning or --hybrid and --model but no --sae, the query runs over every SAE of the
    model and the hits are grouped by SAE version."""
    from saereg.registry.errors import UsageError

    if meaning and hybrid:
        raise UsageError("give --meaning or --hybrid, not both")
    if meaning or hybrid:
        from saereg.analysis import semantic

        kw = dict(hook=hook, min_rate=min_rate, max_rate=max_rate, limit=limit, hybrid=hybrid)
        if model and not sae:
            groups = semantic.search_meaning_grouped(query, model=model, **kw)
            if not groups:
                click.echo("no matching features")
            for g in groups:
                click.echo(f"== {g.ref}\t{g.hook}")
                for h in g.hits:
                    click.echo(_hit_line(h, score=True))
        else:
            hits = semantic.search_meaning(query, model=model, sae=sae, **kw)
            if not hits:
                click.echo("no matching features")
            for h in hits:
                click.echo(_hit_line(h, score=True))
        missing = semantic.unembedded()
        if missing:
            click.echo(f"note: {missing} labels have no embedding yet and were not searched; "
                       "run `saereg labels embed`", err=True)
        return
    from saereg.analysis.search import search_labels

    hits = search_labels(query, model=model, hook=hook, sae=sae, min_rate=min_rate,
                         max_rate=max_rate, limit=limit)
    if not hits:
        click.echo("no matching features")
    for h in hits:
        click.echo(_hit_line(h))


def _hit_line(h, score: bool = False) -> str:
    rate = "-" if h.firing_rate is None else f"{h.firing_rate:.2e}"
    matched = f"\t(matched an older label: {h.matched})" if h.matched else ""
    head = f"{h.ref}\t{h.feature_index}\t{rate}\t{h.method}\t" + (f"{h.rank:.3f}\t" if score
                                                               else "")
    return f"{head}{h.label}{matched}"


@click.group()
def labels():
    """Feature labels across SAEs: sentence embeddings for search by meaning."""


@labels.command("embed")
@click.option("--sae", "ref", default=None, help="Only the labels of this SAE version "
              "(default: every label in the catalog).")
def labels_embed(ref):
    """Embed every label that has no embedding yet (labels pulled from the hub, or written
    before search by meaning existed); safe to stop and run again."""
    from saereg.analysis.embed import EMBED_MODEL, backfill, progress_line

    added = backfill(ref, progress=progress_line(every_s=0))
    click.echo(f"{added} labels embedded with {EMBED_MODEL}")


@click.command("explain-prompt")
@click.argument("prompt")
@click.option("--sae", "ref", required=True, help="SAE version reference.")
@click.option("--top", default=5, show_default=True, type=int)
def explain_prompt(prompt, ref, top):
    """The top features of an SAE on each token of PROMPT, with their labels."""
    from saereg.analysis.prompt import explain_prompt as explain
    from saereg.analysis.tokens import display_token

    for tf in explain(prompt, ref, top=top):
        feats = "  ".join(f"#{i} {v:.2f}" + (f" ({lab})" if lab else "")
                          for i, v, lab in tf.features)
        click.echo(f"{tf.position:>4} {display_token(tf.token):<16} {feats}")
