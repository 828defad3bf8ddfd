"""Pull an SAE by its release name (SAELens's release table, :mod:`.releases`) into the catalog.

A pull, in order:

1. looks the release and SAE id up in the table and refuses a layout this project does not
   convert (one error naming it, before anything is asked of the Hub);
2. resolves the revision (default ``main``) to a commit; if the catalog already records a pull
   of this repo, path and commit, that version is the answer and nothing is downloaded;
3. downloads only that SAE's files at the pinned commit, with huggingface_hub, into a folder of
   its own (every remote name confined by :func:`saereg.registry.hub.verify.remote_path` first;
   each file checked against the Hub's listing: size and sha256 / git blob sha1);
4. converts it to this project's module (:mod:`saereg.registry.sae.published`), writes it in
   the SAELens 6 layout, loads that folder back and checks that it encodes as the layout
   defines (the layout's reference encoder on random inputs);
5. registers it, in one catalog transaction with its pull record (publications: repo, path,
   revision, commit). The provenance is its lineage: ``source_uri`` is ``hf://REPO/PATH@COMMIT``,
   the tags ``saelens.release``, ``saelens.sae_id``, ``saelens.layout``, ``hub.repo``,
   ``hub.path``, ``hub.commit`` and ``neuronpedia.id`` (when listed), and cfg.json's metadata
   ``saelens_release`` holds them all (with the layout's facts, such as a folded input scale).
   The tag ``saelens:RELEASE`` = ID is what ``saelens://RELEASE/ID`` resolves by; a release
   that names a folder pulled before through another release only adds its own such tag.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from saereg.registry.errors import NotFoundError, UsageError
from saereg.registry.hub import releases as table_mod
from saereg.registry.hub import verify
from saereg.registry.refs import format_hf_ref, format_release_ref, validate_name, \
    validate_repo_id, validate_revision

@dataclass
class PulledRelease:
    ref: str
    release: str
    sae_id: str
    repo: str
    path: str
    commit: str
    layout: str
    added: bool
    downloaded_bytes: int = 0


def default_name(release: str, sae_id: str) -> str:
    """A catalog name for a release's SAE: ``RELEASE.ID`` with every other character made
    ``_`` and ``/`` made ``.``; a name over 128 characters keeps its start and a hash."""
    text = re.sub(r"[^A-Za-z0-9._-]", "_", f"{release}.{sae_id.replace('/', '.')}")
    text = re.sub(r"^[^A-Za-z0-9]+", "", text) or "sae"
    if len(text) > 128:
        text = text[:115] + "-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return validate_name(text)


def _pulled_before(cat, repo: str, path: str, commit: str) -> str | None:
    from sqlalchemy import select

    from saereg.registry.catalog.schema import Publication, SAERecord, SAEVersion

    with cat.session() as s:
        row = s.execute(
            select(SAERecord.name, SAEVersion.number).select_from(Publication)
            .join(SAEVersion, SAEVersion.id == Publication.version_id)
            .join(SAERecord, SAERecord.id == SAEVersion.sae_id)
            .where(Publication.direction == "pull", Publication.repo == repo,
                   Publication.path == path, Publication.commit == commit)
            .order_by(SAEVersion.id).limit(1)).first()
    return f"{row[0]}@{row[1]}" if row else None


def _listing(api, repo: str, commit: str, required: list[str], optional: list[str],
             where: str) -> dict[str, verify.Listed]:
    """The Hub's listing of the required files (each must be there) and of those optional
    files it has."""
    wanted = required + optional
    present = {getattr(e, "path", None) for e in api.get_paths_info(repo, wanted,
                                                                    revision=commit)}
    missing = [p for p in required if p not in present]
    if missing:
        raise NotFoundError("file", missing[0], hint=f"in {where}; the release table names an "
                            "SAE this repo does not hold there")
    return verify.hub_listing(api, repo, commit, [p for p in wanted if p in present], where)


def pull_release(release: str, sae_id: str, *, revision: str | None = None,
                 name: str | None = None, table: str | None = None,
                 database_url: str | None = None) -> PulledRelease:
    """Pull SAE ``sae_id`` of ``release`` into the catalog (see the module docstring)."""
    from saereg.registry.catalog.queries import RELEASE_TAG, SAE_ID_TAG, release_tag
    from saereg.registry.catalog.sources import read_folder
    from saereg.registry.catalog.writes import Catalog, DuplicateVersionError, PublicationRecord
    from saereg.registry.hub.card import sha256_file
    from saereg.registry.hub.sync import _api, hub_errors
    from saereg.registry.sae import published
    from saereg.registry.sae.folder import load_sae, save_sae

    rel = table_mod.get_release(release, table)
    entry = rel.sae(sae_id)
    layout = table_mod.check_supported(rel, entry)
    repo = validate_repo_id(rel.repo)
    path = verify.remote_path(entry.path, f"release {release}: path of {sae_id}")
    required, optional = published.repo_files(layout, path)
    for p in required + optional:
        verify.remote_path(p, f"release {release}: file of {sae_id}")
    rev = validate_revision(revision) if revision else "main"
    name = validate_name(name) if name else default_name(release, sae_id)
    api = _api()
    with hub_errors(f"reading {repo}@{rev}", repo, rev):
        info = api.repo_info(repo, revision=rev)
    commit = verify.check_commit(info.sha, f"Hub repo {repo}@{rev}")
    cat = Catalog(database_url)
    mark = {release_tag(release): sae_id}
    found = _pulled_before(cat, repo, path, commit)
    if found is not None:  # pulled before (perhaps by another release naming the same folder)
        if cat.get(found).tags.get(release_tag(release)) != sae_id:
            cat.tag(found, mark)
        return PulledRelease(found, release, sae_id, repo, path, commit, layout, added=False)
    where = f"{format_release_ref(release, sae_id)} ({repo} at {commit[:12]})"
    with hub_errors(f"reading the file list of {repo}@{rev}", repo, rev):
        listing = _listing(api, repo, commit, required, optional, where)
    meta = {"model_name": rel.model, "hook_name": table_mod.hook(rel, entry) or path}
    provenance = {"release": release, "sae_id": sae_id, "repo": repo, "path": path,
                  "revision": rev, "commit": commit, "layout": layout,
                  "conversion": entry.conversion, "neuronpedia_id": entry.neuronpedia,
                  "norm_scaling_factor": entry.norm_scaling_factor, "l0": entry.l0}
    with tempfile.TemporaryDirectory(prefix="saereg-release-") as tmp:
        root = Path(tmp) / "files"
        with hub_errors(f"downloading {where}", repo, rev):
            for repo_path in listing:  # exactly the checked names, at the pinned commit
                api.hf_hub_download(repo, repo_path, revision=commit, local_dir=str(root))
        size = 0
        for repo_path, listed in listing.items():
            verify.check_download(root / repo_path, listed, where)
            size += listed.size
        conv = published.convert(layout, root / path, meta=meta, repo=repo,
                                 norm_scaling_factor=entry.norm_scaling_factor)
        conv.sae.cfg.metadata.update(
            {k: v for k, v in meta.items() if not conv.sae.cfg.metadata.get(k)})
        if entry.neuronpedia:
            conv.sae.cfg.metadata["neuronpedia_id"] = entry.neuronpedia
        conv.sae.cfg.metadata["saelens_release"] = {**provenance, **conv.facts}
        sparsity = None
        if (root / f"{path}/sparsity.safetensors").is_file() and layout == "saelens":
            from safetensors.torch import load_file

            sparsity = load_file(str(root / f"{path}/sparsity.safetensors")).get("sparsity")
        folder = save_sae(conv.sae, Path(tmp) / "sae", log_sparsity=sparsity
                          if sparsity is not None and sparsity.shape == (conv.sae.cfg.d_sae,)
                          else None)
        conv.sae = load_sae(folder)  # what is registered is what is checked
        published.check_encodes(conv, where)
        src = read_folder(folder)
        src.kind, src.uri = "hub", format_hf_ref(repo, path, commit)
        if entry.l0 is not None:
            src.params["saelens.l0"] = str(entry.l0)
        tags = {RELEASE_TAG: release, SAE_ID_TAG: sae_id, **mark, "saelens.layout": layout,
                "hub.repo": repo, "hub.path": path, "hub.commit": commit}
        if entry.neuronpedia:
            tags["neuronpedia.id"] = entry.neuronpedia
        same = {f: sha256_file(folder / f) for f in ("cfg.json", "sae_weights.safetensors")}
        pub = PublicationRecord("pull", repo, path, rev, commit)
        try:
            v = cat.register_source(src, name, tags=tags, publication=pub, same_files=same)
        except DuplicateVersionError as e:  # these files are a version already (a concurrent
            cat.record_publication(e.ref, pub)  # pull won): it gets the pull record, once
            cat.tag(e.ref, mark)
            return PulledRelease(e.ref, release, sae_id, repo, path, commit, layout,
                                 added=False, downloaded_bytes=size)
    return PulledRelease(v.ref, release, sae_id, repo, path, commit, layout, added=True,
                         downloaded_bytes=size)


def pull_ref(ref: str, *, table: str | None = None, database_url: str | None = None
             ) -> PulledRelease:
    """Pull what a ``saelens://RELEASE/ID[@REV]`` reference names."""
    from saereg.registry.refs import parse_ref

    parsed = parse_ref(ref)
    if parsed.kind != "release":
        raise UsageError(f"{ref!r} is not a saelens://RELEASE/ID reference")
    return pull_release(parsed.name, parsed.repo_path, revision=parsed.revision, table=table,
                        database_url=database_url)

