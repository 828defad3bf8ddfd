"""Hugging Face Hub sync: push catalog versions to a repo, pull published SAEs into the catalog,
and load ``hf://ORG/NAME/PATH@REV`` references for other projects.

A push uploads, in one commit, ``PATH/`` with the SAELens files (cfg.json,
sae_weights.safetensors, sparsity.safetensors), registry.json and features.parquet, plus the
repo's README model card; then it tags the commit ``NAME-vN`` and records the publication in
the catalog. The publication is recorded only after the commit and the tag exist, so a failed
upload leaves nothing recorded and a retry completes it (the Hub skips unchanged files).
:func:`saereg.registry.hub.features_push.push_features` later replaces a pushed folder's
features.parquet on main (labels and statistics added since; the tag and SAE files stay). A
pull records each new version with its features, labels, statistics and pull record in one
catalog transaction; for a version the catalog has, it adds the labels and stats runs the file
holds that the catalog lacks. This module writes no catalog rows itself: it calls the public
methods of
:class:`saereg.registry.catalog.writes.Catalog`.

Nothing remote is trusted further than :mod:`saereg.registry.hub.verify` checks it: a pull
downloads the files the Hub lists at the pinned commit into a folder of its own (removed
afterwards; huggingface_hub's cache is left alone), checks each against that listing and against
registry.json, and only then records anything. A push checks every stored file before it
creates or changes anything on the Hub.

Credentials are huggingface_hub's: ``HF_TOKEN`` or the stored login; ``HF_ENDPOINT`` picks the
server. The token is never printed, logged, saved or put in an error message.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from saereg.registry.errors import HubError, NotFoundError, UsageError, redact
from saereg.registry.hub import verify
from saereg.registry.hub.card import (FEATURES_FILE, README_FILE, REGISTRY_FILE, read_index,
                                      registry_record, render_card, sha256_file)
from saereg.registry.hub.verify import PUBLISHED_FILES, SAE_FILES
from saereg.registry.refs import (format_hf_ref, parse_ref, validate_repo_id, validate_repo_path,
                                  validate_revision)

if TYPE_CHECKING:
    from saereg.registry.catalog.writes import Catalog


@dataclass
class Publication:
    ref: str
    repo: str
    path: str
    revision: str
    commit: str
    skipped: bool = False


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=_endpoint(), library_name="sae-registry")


def _scrub(text: str) -> str:
    """First line of an error, redacted (the HF token, URL credentials, ...)."""
    return redact(str(text).strip().splitlines()[0] if str(text).strip() else type(text).__name__)


@contextlib.contextmanager
def hub_errors(what: str, repo: str, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub and network errors into one clear project error."""
    from huggingface_hub import errors as hf

    try:
        yield
    except hf.RevisionNotFoundError:
        raise NotFoundError("revision", revision or "main",
                            hint=f"of Hub repo {repo}; see its branches and tags") from None
    except hf.RepositoryNotFoundError:
        raise NotFoundError("Hub repo", repo, hint="check the name, HF_ENDPOINT and your "
                            "access (HF_TOKEN or `hf auth login`)") from None
    except hf.LocalEntryNotFoundError as e:
        raise HubError(f"{what} failed: not in the local huggingface_hub cache, and the Hub "
                       f"could not be asked ({_scrub(e)})") from None
    except hf.EntryNotFoundError:
        raise HubError(f"{what} failed: a file is missing from Hub repo {repo} at "
                       f"{revision or 'main'}") from None
    except hf.HFValidationError as e:
        raise UsageError(f"{what}: {_scrub(e)}") from None
    except hf.HfHubHTTPError as e:
        if getattr(getattr(e, "response", None), "status_code", None) == 412:
            raise HubError(f"{what} failed: {revision or 'main'} of {repo} moved while it ran "
                           "(another commit landed first); nothing was changed, run it "
                           "again") from None
        raise HubError(f"{what} failed: {_scrub(e)}") from None
    except hf.OfflineModeIsEnabled as e:
        raise HubError(f"{what} failed: {_scrub(e)}") from None
    except OSError as e:
        raise HubError(f"{what} failed: {_scrub(e)}") from None
    except RuntimeError as e:  # the client wraps a failed LFS upload in a RuntimeError
        cause = f" ({_scrub(e.__cause__)})" if e.__cause__ is not None else ""
        raise HubError(f"{what} failed: {_scrub(e)}{cause}") from None
    except (ValueError, KeyError, TypeError) as e:  # the client's own checks; a malformed answer
        raise HubError(f"{what} failed: {type(e).__name__}: {_scrub(e)}") from None
    except Exception as e:  # httpx transport errors
        if type(e).__module__.split(".")[0] in ("httpx", "httpcore", "httpx2"):
            raise HubError(f"{what} failed: {type(e).__name__}: {_scrub(e)}") from None
        raise


# -- push ------------------------------------------------------------------------------------

def _feature_export(cat: Catalog, info):  # noqa: ANN001 - a VersionInfo
    from saereg.registry.hub import features as hub_features

    with cat.session() as s:
        return hub_features.collect(s, info.id, info.d_sae)


def repo_folder(path: str | None, default: str = "") -> str:
    """A folder inside a repo given by the user: relative to the repo's root (a leading ``/``
    is refused, not dropped), checked by :func:`saereg.registry.refs.validate_repo_path`."""
    if path is not None and str(path).startswith("/"):
        raise UsageError(f"invalid path in repo {path!r}: give a folder relative to the repo's "
                         "root, without a leading '/'")
    return validate_repo_path(default if path is None else path)


def _current_readme(api, repo: str) -> str | None:
    from huggingface_hub import errors as hf

    with tempfile.TemporaryDirectory(prefix="saereg-card-") as tmp:
        try:
            local = api.hf_hub_download(repo, README_FILE, revision="main", cache_dir=tmp)
        except hf.LocalEntryNotFoundError:
            raise
        except (hf.EntryNotFoundError, hf.RevisionNotFoundError):
            return None
        return Path(local).read_text(encoding="utf-8")


def push(ref: str, repo: str, *, path: str | None = None, private: bool = False,
         database_url: str | None = None) -> Publication:
    """Publish catalog version ``ref`` to Hub repo ``repo`` at folder ``path`` (default: the SAE
    name) and tag it ``NAME-vN``. Pushing a version already published there is a no-op."""
    from saereg.registry.catalog.store import ArtifactStore
    from saereg.registry.catalog.writes import Catalog, PublicationRecord
    from saereg.registry.hub import features as hub_features

    validate_repo_id(repo)
    cat = Catalog(database_url)
    info = cat.get(ref)
    path = repo_folder(path, info.name)
    tag = f"{info.name}-v{info.number}"
    row = cat.find_publication(info.ref, "push", repo, path)
    if row is not None:
        return Publication(info.ref, repo, path, row.revision, row.commit, skipped=True)
    with tempfile.TemporaryDirectory(prefix="saereg-push-") as tmp:
        # every stored file is checked (materialize verifies its sha256) before anything remote
        stage = Path(tmp) / "stage"
        folder = stage / path if path else stage
        folder.mkdir(parents=True)
        ArtifactStore(info.artifact_uri).materialize(info.files, folder, where=info.ref)
        hub_features.write(folder / FEATURES_FILE, _feature_export(cat, info))
        files = {f: folder / f for f in (*SAE_FILES, FEATURES_FILE) if (folder / f).is_file()}
        record = registry_record(info, files)
        (folder / REGISTRY_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        api = _api()
        with hub_errors(f"pushing {info.ref} to {repo}", repo):
            api.create_repo(repo, private=private, exist_ok=True)
            tags = {t.name: t.target_commit for t in api.list_repo_refs(repo).tags}
            readme = _current_readme(api, repo)
        if tag in tags:  # tagged by an earlier push whose recording did not finish
            commit = tags[tag]
            _check_same(api, repo, path, commit, record, tag)
        else:
            index = read_index(readme)
            index[path] = {"name": info.name, "version": info.number, "tag": tag,
                           "model": info.model, "hook": info.hook,
                           "architecture": info.architecture, "d_sae": info.d_sae,
                           "l0": info.key_metrics.get("l0"),
                           "explained_variance": info.key_metrics.get("explained_variance")}
            (stage / README_FILE).write_text(render_card(repo, index, readme), encoding="utf-8")
            with hub_errors(f"pushing {info.ref} to {repo}", repo), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*commit a data file.*")
                commit = api.upload_folder(repo_id=repo, folder_path=str(stage),
                                           commit_message=f"Publish {info.ref} at {path or '.'}"
                                           ).oid
                api.create_tag(repo, tag=tag, revision=commit, tag_message=f"{info.ref}")
    cat.record_publication(info.ref, PublicationRecord("push", repo, path, tag, commit))
    return Publication(info.ref, repo, path, tag, commit)


def _check_same(api, repo: str, path: str, commit: str, record: dict, tag: str) -> None:
    from huggingface_hub import errors as hf

    prefix = f"{path}/" if path else ""
    with (hub_errors(f"reading {tag} of {repo}", repo, tag),
          tempfile.TemporaryDirectory(prefix="saereg-tag-") as tmp):
        try:
            local = api.hf_hub_download(repo, prefix + REGISTRY_FILE, revision=commit,
                                        cache_dir=tmp)
            theirs = json.loads(Path(local).read_text()).get("files", {})
        except hf.LocalEntryNotFoundError:
            raise
        except (hf.EntryNotFoundError, ValueError, AttributeError):
            theirs = {}
    mine = record["files"]
    if any(theirs.get(f, {}).get("sha256") != mine[f]["sha256"] for f in SAE_FILES if f in mine):
        raise HubError(f"tag {tag} already exists in {repo} and points at different files; "
                       "refusing to overwrite a published version")


def push_all(name: str, repo: str, *, path: str | None = None, private: bool = False,
             database_url: str | None = None) -> list[Publication]:
    """Push every version of SAE ``name`` not yet published to ``repo``, oldest first."""
    from saereg.registry.catalog.writes import Catalog

    versions = [v for v in Catalog(database_url).list(name=parse_ref(name).name)
                if v.name == name]
    if not versions:
        Catalog(database_url).get(name)  # raises the error that lists known SAEs
    return [push(v.ref, repo, path=path, private=private, database_url=database_url)
            for v in versions]


# -- pull ------------------------------------------------------------------------------------

def parse_repo_spec(spec: str) -> tuple[str, str | None]:
    """``ORG/NAME[@REV]`` -> (repo, revision)."""
    repo, sep, rev = str(spec).partition("@")
    return validate_repo_id(repo), (validate_revision(rev) if sep else None)


def _download(repo: str, revision: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns,
                                  endpoint=_endpoint()))


@dataclass
class Pulled:
    ref: str
    repo: str
    path: str
    commit: str
    added: bool
    labels: int = 0
    """Labels recorded with the version (its whole label history from features.parquet)."""
    stats_tokens: int | None = None
    """Tokens of the stats run recorded with the version (None: none came with it)."""


def pull(spec: str, *, path: str | None = None, name: str | None = None,
         database_url: str | None = None) -> list[Pulled]:
    """Register the SAE folders of Hub repo ``ORG/NAME[@REV]`` (those under ``path``, if given)
    into the catalog, with their metrics, lineage and features. Every file is checked against
    the Hub's listing at the pinned commit and against registry.json before anything is
    recorded (see :mod:`saereg.registry.hub.verify`). Each new version is recorded together
    with its pull record (repo, path, revision, commit), in one catalog transaction. A folder
    whose files are already a version of the same SAE adds nothing, except the pull record of a
    version pulled from there before that lacks one."""
    from saereg.registry.catalog.writes import Catalog

    repo, rev = parse_repo_spec(spec)
    prefix = repo_folder(path)
    api = _api()
    with hub_errors(f"reading {repo}", repo, rev):
        info = api.repo_info(repo, revision=rev)
    commit = verify.check_commit(info.sha, f"Hub repo {repo}@{rev or 'main'}")
    where = f"Hub repo {repo} at {commit[:12]}"
    folders = verify.sae_folders([s.rfilename for s in info.siblings or []], prefix, where)
    if not folders:
        raise NotFoundError("SAE folder", prefix or "(repo root)",
                            hint=f"no cfg.json under it in {repo}@{rev or 'main'}")
    if name is not None and len(folders) > 1:
        raise UsageError(f"--name needs one SAE folder; {repo} has {len(folders)} under "
                         f"{prefix or 'its root'} (pass --path)")
    paths = [p for files in folders.values() for p in files]
    with hub_errors(f"reading the file list of {repo}@{rev or 'main'}", repo, rev):
        listing = verify.hub_listing(api, repo, commit, paths, where)
    with tempfile.TemporaryDirectory(prefix="saereg-pull-") as tmp:
        root = Path(tmp) / "files"
        with hub_errors(f"downloading {repo}@{rev or 'main'}", repo, rev):
            for repo_path in paths:  # exactly the checked names, at the pinned commit
                api.hf_hub_download(repo, repo_path, revision=commit, local_dir=str(root))
        records = {}
        for f, files in folders.items():
            ref = format_hf_ref(repo, f, commit)
            for repo_path in files:
                verify.check_download(root / repo_path, listing[repo_path], ref)
            records[f] = verify.check_folder(root / f if f else root, ref)
        cat = Catalog(database_url)
        return [_register_pulled(cat, repo, f, commit, rev, root / f if f else root, records[f],
                                 name) for f in folders]


def _already_pulled(cat: Catalog, name: str, same: dict[str, str], pulled) -> str | None:
    """The version of SAE ``name`` whose files are ``same`` (name -> sha256), if there is one.
    One pulled from the same repo folder before gets ``pulled`` (its pull record) if it lacks
    it: an interrupted older pull may have left it without (one that is there stays)."""
    from saereg.registry.errors import SAENotFoundError

    try:
        existing = cat.list(name=name)
    except SAENotFoundError:
        existing = []
    for row in existing:
        if row.name != name:
            continue
        v = cat.get(row.ref)
        have = {f.name: f.sha256 for f in v.files}
        if all(have.get(f) == sha for f, sha in same.items()):
            if (v.tags.get("hub.repo"), v.tags.get("hub.path")) == (pulled.repo,
                                                                     pulled.path or "."):
                cat.record_publication(v.ref, pulled)
            return v.ref
    return None


def _register_pulled(cat: Catalog, repo: str, folder: str, commit: str, rev: str | None,
                     local: Path, record: dict | None, name: str | None) -> Pulled:
    from saereg.registry.catalog.sources import read_folder
    from saereg.registry.catalog.writes import DuplicateVersionError, PublicationRecord
    from saereg.registry.hub import features as hub_features
    from saereg.registry.refs import validate_name

    record = record or {}
    pulled = PublicationRecord("pull", repo, folder, rev or commit, commit)
    name = validate_name(name or record.get("name") or folder.rsplit("/", 1)[-1] or
                         repo.split("/")[1])
    src = read_folder(local)
    export = None
    if (local / FEATURES_FILE).is_file():  # checked whole before anything is recorded
        export = hub_features.read(local / FEATURES_FILE, src.d_sae)
    source = format_hf_ref(repo, folder, commit)
    same = {f: sha256_file(local / f) for f in ("cfg.json", "sae_weights.safetensors")}
    ref = _already_pulled(cat, name, same, pulled)
    if ref is None:
        lineage = record.get("lineage") or {}
        src.kind, src.uri = "hub", source
        src.metrics = {k: float(v) for k, v in (record.get("metrics") or {}).items()}
        src.dataset = lineage.get("dataset") or src.dataset
        src.training_tokens = lineage.get("training_tokens") or src.training_tokens
        src.context_size = lineage.get("context_size") or src.context_size
        tags = {"hub.repo": repo, "hub.path": folder or ".", "hub.commit": commit}
        if record.get("version") is not None:
            tags["hub.version"] = str(record["version"])
        if lineage.get("mlflow_run_id"):
            tags["hub.mlflow_run_id"] = str(lineage["mlflow_run_id"])
        if export is not None and src.log10_rates is None and any(
                r is not None for r in export.log10_rates):
            src.log10_rates = export.log10_rates
        merged = []
        try:
            info = cat.register_source(
                src, name, tags=tags, publication=pulled, same_files=same,
                extra=None if export is None else lambda s, vid: merged.append(
                    hub_features.merge(s, vid, export, source=source)))
        except DuplicateVersionError as e:  # another pull of these files committed first
            ref = _already_pulled(cat, name, same, pulled) or e.ref
        else:
            done = merged[-1] if merged else hub_features.Merged()
            return Pulled(info.ref, repo, folder, commit, added=True, labels=done.labels,
                          stats_tokens=done.stats_tokens)
    if export is None:
        return Pulled(ref, repo, folder, commit, added=False)
    # the version is here already: what its features.parquet holds that the catalog does not
    # (labels written, a stats run made upstream since it was pulled) is added
    done = cat.add_feature_data(ref, lambda s, vid: hub_features.merge(s, vid, export,
                                                                      source=source),
                                what=f"adding the features of {source} to {ref}")
    return Pulled(ref, repo, folder, commit, added=False, labels=done.labels,
                  stats_tokens=done.stats_tokens)


# -- hf:// references ------------------------------------------------------------------------

def download_ref(ref: str) -> tuple[Path, str]:
    """Download (or find in huggingface_hub's cache) the files of an ``hf://`` reference,
    checked against its registry.json; returns the local folder and a description."""
    parsed = parse_ref(ref)
    if parsed.kind != "hub":
        raise UsageError(f"{ref!r} is not an hf:// reference")
    prefix = f"{parsed.repo_path}/" if parsed.repo_path else ""
    rev = parsed.revision or "main"
    with hub_errors(f"downloading {ref}", parsed.repo, rev):
        root = _download(parsed.repo, rev, [prefix + n for n in PUBLISHED_FILES])
    folder = root / parsed.repo_path if parsed.repo_path else root
    if not (folder / "cfg.json").is_file():
        raise NotFoundError("SAE folder", parsed.repo_path or "(repo root)",
                            hint=f"no cfg.json there in {parsed.repo}@{rev}")
    import huggingface_hub.constants as hf_constants

    present = [prefix + n for n in PUBLISHED_FILES if (folder / n).is_file()]
    listing = None
    if not hf_constants.HF_HUB_OFFLINE:  # offline, the cached files are all there is to check
        commit = verify.check_commit(root.name, ref)  # snapshots/<commit>
        with hub_errors(f"reading the file list of {ref}", parsed.repo, rev):
            try:
                listing = verify.hub_listing(_api(), parsed.repo, commit, present, ref)
            except Exception as e:  # unreachable: served from the cache, as when offline
                if type(e).__module__.split(".")[0] not in ("httpx", "httpcore"):
                    raise
    for repo_path in present if listing is not None else ():
        verify.check_download(root / repo_path, listing[repo_path], ref)
    verify.check_folder(folder, ref)
    return folder, ref
