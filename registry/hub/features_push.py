"""Publishing the labels and statistics a version gained after it was pushed: its folder's
features.parquet (and that file's sha256 in registry.json) replaced on main in one commit; the
version's tag and SAE files stay as published. A pull of that commit into a catalog that has
the version adds what is new (:func:`saereg.registry.hub.features.merge`).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

from saereg.registry.errors import HubError, UsageError
from saereg.registry.hub import verify
from saereg.registry.hub.card import FEATURES_FILE, REGISTRY_FILE, sha256_file
from saereg.registry.hub.sync import (Publication, _api, _feature_export, hub_errors,
                                      repo_folder)
from saereg.registry.hub.verify import SAE_FILES
from saereg.registry.refs import validate_repo_id


def push_features(ref: str, repo: str, *, path: str | None = None,
                  database_url: str | None = None) -> Publication:
    """Publish the labels and statistics that version ``ref`` has now, for a version pushed to
    ``repo`` at ``path`` before: one commit on main replaces the folder's features.parquet and
    the file's sha256 in its registry.json, made on the commit read (a push that moved main
    meanwhile makes the Hub refuse it). The version's tag and its SAE files stay as published;
    a pull of main then adds what is new to a catalog that has the version. Refused when the
    folder on main holds other SAE files (a later version pushed there); a no-op when the
    features are the same."""
    from huggingface_hub import CommitOperationAdd

    from saereg.registry.catalog.writes import Catalog
    from saereg.registry.hub import features as hub_features

    validate_repo_id(repo)
    cat = Catalog(database_url)
    info = cat.get(ref)
    path = repo_folder(path, info.name)
    where = f"{repo}/{path or '.'}"
    if cat.find_publication(info.ref, "push", repo, path) is None:
        at = f" --path {path}" if path != info.name else ""
        raise UsageError(f"{info.ref} was not pushed to {where}; push it first: saereg sync "
                         f"push {info.ref} --repo {repo}{at}")
    prefix = f"{path}/" if path else ""
    api = _api()
    with tempfile.TemporaryDirectory(prefix="saereg-features-") as tmp:
        with hub_errors(f"reading {where}", repo, "main"):
            head = verify.check_commit(api.repo_info(repo, revision="main").sha,
                                       f"Hub repo {repo}@main")
            local = api.hf_hub_download(repo, prefix + REGISTRY_FILE, revision=head,
                                        cache_dir=tmp)
        record = verify.read_record(Path(local), f"{where} at {head[:12]}")
        theirs, mine = record["files"], {f.name: f.sha256 for f in info.files}
        if any(theirs.get(f, {}).get("sha256") != mine.get(f) for f in SAE_FILES if f in mine):
            held = _named_version(record) or "another SAE"
            raise HubError(f"{where} on main holds other SAE files than {info.ref} now ({held}, "
                           "by its registry.json); refusing to put its features there")
        features = Path(tmp) / FEATURES_FILE
        hub_features.write(features, _feature_export(cat, info))
        sha = sha256_file(features)
        if (theirs.get(FEATURES_FILE) or {}).get("sha256") == sha:
            return Publication(info.ref, repo, path, "main", head, skipped=True)
        record["files"][FEATURES_FILE] = {"sha256": sha, "size": features.stat().st_size}
        registry = Path(tmp) / REGISTRY_FILE
        registry.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        ops = [CommitOperationAdd(prefix + FEATURES_FILE, str(features)),
               CommitOperationAdd(prefix + REGISTRY_FILE, str(registry))]
        with hub_errors(f"publishing the features of {info.ref} to {repo}", repo, "main"),\
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*commit a data file.*")
            commit = api.create_commit(repo, ops, parent_commit=head,
                                       commit_message=f"Update the features of {info.ref} at "
                                                      f"{path or '.'}").oid
    return Publication(info.ref, repo, path, "main", commit)


def _named_version(record: dict) -> str | None:
    """NAME@N from a registry.json read from the Hub, when its name and version are valid."""
    from saereg.registry.refs import validate_name

    name, number = record.get("name"), record.get("version")
    try:
        ok = isinstance(number, int) and not isinstance(number, bool) and number > 0 and \
            isinstance(name, str) and validate_name(name) == name
    except UsageError:
        ok = False
    return f"{name}@{number}" if ok else None
