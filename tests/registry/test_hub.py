"""Hub sync through the real, unmodified huggingface_hub client against a hub-compatible HTTP
server on 127.0.0.1 (tests/hubserver.py): `saereg sync push` uploads the SAELens files,
registry.json (sha256 of every file, metrics, lineage), features.parquet and a README model card
(YAML metadata, a table with L0 and explained variance), tags NAME-vN and records the
publication; re-pushing is a no-op and --all pushes only what is missing; `saereg sync pull`
into a second, empty SAEREG_HOME registers identical weights, features and metrics with the
source repo and commit, and pulling twice adds nothing; load_sae("hf://...") loads a pinned
revision, also with HF_HUB_OFFLINE=1 once cached, and sae_lens loads the pulled folder and
encodes the same. Bad repo ids, unknown revisions, a tampered file and a server error in the
middle of an upload each give one clear error and record nothing; a retry completes. The HF
token reaches the server but no output, file, catalog or MLflow store. Labels added after a push
go out with `sync push --features` and come into a catalog that has the version with a pull;
a features.parquet holding what the catalog cannot keep is refused by feature and field."""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
import torch
from catalog_helpers import log_training_run, make_sae_folder, table_counts
from click.testing import CliRunner
from hubserver import serve_hub_online
from sqlalchemy import select

from saereg.commands.main import cli
from saereg.registry.api import load_sae
from saereg.registry.catalog import db
from saereg.registry.catalog.schema import Publication
from saereg.registry.catalog.writes import Catalog
from saereg.registry.errors import (ChecksumError, HubError, NotFoundError, SAEFormatError,
                                    UsageError)
from saereg.registry.hub.sync import pull, push

SECRET = "hf_TESTSECRETtoken0123456789"
REPO = "acme/tiny-saes"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The test hub server, with huggingface_hub online, pointed at it, Xet off, its own cache
    and a token in HF_TOKEN."""
    yield from serve_hub_online(monkeypatch, tmp_path / "hf-home", SECRET)


@pytest.fixture
def home(mlflow_store, monkeypatch):
    """The SQLite catalog of this test's SAEREG_HOME with two versions of ``tiny`` (registered
    from training-shaped MLflow runs, so they carry metrics and lineage)."""
    monkeypatch.delenv("SAEREG_DATABASE_URL", raising=False)
    cat = Catalog()
    from saereg.registry.paths import saereg_home

    work = saereg_home() / "work"
    for seed in (1, 2):
        rid = log_training_run(mlflow_store, work, seed=seed,
                               metrics={"eval/l0": 4.0 + seed, "eval/explained_variance": 0.7})
        cat.register_run(rid, "tiny")
    yield cat
    db.dispose_all()


def switch_home(path, mlflow_template, monkeypatch) -> Catalog:
    """A second, empty SAEREG_HOME (with a migrated MLflow store)."""
    db.dispose_all()
    path.mkdir(parents=True)
    monkeypatch.setenv("SAEREG_HOME", str(path))
    shutil.copy(mlflow_template, path / "mlflow.db")
    return Catalog()


def features_of(version_id: int) -> list[tuple[int, float | None]]:
    from saereg.registry.catalog.schema import Feature

    with db.session() as s:
        return list(s.execute(select(Feature.feature_index, Feature.log10_firing_rate)
                              .where(Feature.version_id == version_id)
                              .order_by(Feature.feature_index)).tuples())


def sh(*args: str):
    return CliRunner().invoke(cli, list(args))


def publications() -> list[tuple]:
    with db.session() as s:
        return list(s.execute(select(Publication.direction, Publication.repo, Publication.path,
                                     Publication.revision, Publication.commit)).tuples())


def test_push_then_pull_round_trip(hub, home, tmp_path, mlflow_template, monkeypatch):
    v1, v2 = home.get("tiny@1"), home.get("tiny@2")
    result = sh("sync", "push", "tiny@1", "--repo", REPO)
    assert result.exit_code == 0, result.output
    assert "published to acme/tiny-saes/tiny @ tiny-v1" in result.output
    files = hub.files(REPO, "tiny-v1")
    assert {"tiny/cfg.json", "tiny/sae_weights.safetensors", "tiny/sparsity.safetensors",
            "tiny/registry.json", "tiny/features.parquet", "README.md"} <= set(files)
    record = json.loads(files["tiny/registry.json"])
    import hashlib
    for name, meta in record["files"].items():
        assert hashlib.sha256(files[f"tiny/{name}"]).hexdigest() == meta["sha256"]
    assert {f.name: f.sha256 for f in v1.files} == {
        k: v["sha256"] for k, v in record["files"].items() if k != "features.parquet"}
    assert record["metrics"] == v1.metrics and record["version"] == 1
    assert record["lineage"]["mlflow_run_id"] == v1.mlflow_run_id
    assert record["lineage"]["training_tokens"] == 32768
    # the weights went through the LFS batch + PUT path, cfg.json inline in the commit
    assert ("PUT", "lfs-upload") in hub.state.requests
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: saelens\ntags:\n- sae\n")
    assert "| tiny | tiny | 1 | tiny-v1 | tiny-llama | model.layers.1 | topk | 64 | 5.0 | 0.700 |" \
        in card
    [(direction, repo, path, rev, commit)] = publications()
    assert (direction, repo, path, rev) == ("push", REPO, "tiny", "tiny-v1")
    assert hub.state.repos[REPO].tags["tiny-v1"] == commit

    commits = len(hub.state.repos[REPO].commits)
    again = sh("sync", "push", "tiny@1", "--repo", REPO)
    assert again.exit_code == 0 and "already published" in again.output
    assert len(hub.state.repos[REPO].commits) == commits and len(publications()) == 1
    result = sh("sync", "push", "tiny", "--all", "--repo", REPO)
    assert result.exit_code == 0, result.output
    assert "tiny@1: already published" in result.output and "tiny@2: published" in result.output
    assert set(hub.state.repos[REPO].tags) == {"tiny-v1", "tiny-v2"}
    assert "| tiny | tiny | 2 | tiny-v2 |" in hub.files(REPO)["README.md"].decode()
    assert len(publications()) == 2

    # pull into a second, empty home
    other = switch_home(tmp_path / "other-home", mlflow_template, monkeypatch)
    result = sh("sync", "pull", f"{REPO}@tiny-v1")
    assert result.exit_code == 0, result.output
    assert "registered as tiny@1" in result.output
    p1 = other.get("tiny@1")
    assert {f.name: f.sha256 for f in p1.files} == {f.name: f.sha256 for f in v1.files}
    assert p1.metrics == v1.metrics and p1.key_metrics == v1.key_metrics
    assert (p1.dataset, p1.training_tokens) == (v1.dataset, v1.training_tokens)
    assert p1.source_kind == "hub" and p1.source_uri == \
        f"hf://{REPO}/tiny@{hub.state.repos[REPO].tags['tiny-v1']}"
    assert p1.tags["hub.repo"] == REPO and p1.tags["hub.version"] == "1"
    assert len(features_of(p1.id)) == 64
    assert torch.equal(load_sae("tiny@1").W_enc, load_sae("hf://acme/tiny-saes/tiny@tiny-v1").W_enc)
    counts = table_counts()
    result = sh("sync", "pull", f"{REPO}@tiny-v1")
    assert result.exit_code == 0 and "already in the catalog as tiny@1" in result.output
    assert table_counts() == counts
    [pulled] = pull(f"{REPO}@tiny-v2")
    assert pulled.added and pulled.ref == "tiny@2"
    assert other.get("tiny@2").metrics == v2.metrics
    assert [p[0] for p in publications()] == ["pull", "pull"]


def _study(ref: str) -> None:
    """A stats run and a label history (relabelled, machine-made, accepted) on ``ref``."""
    from saereg.analysis.labels import add_label, set_status
    from saereg.analysis.stats import AnalyzeConfig, store_run

    info = home_version(ref)
    rows = [{"feature_index": f, "firing_rate": f / 1000, "mean_activation": 0.5 + f,
             "max_activation": 2.0 + f, "flag": "dead" if f == 5 else None,
             "histogram": {"log10_low": -4.0, "log10_high": 4.0, "counts": [f, 1, 0]},
             "top_examples": [{"tokens": ["a", "b"], "acts": [0.0, 2.0 + f], "peak": 1,
                               "window": f, "position": 1, "token_ids": [7, 8],
                               "doc_id": f"d{f}", "doc_offset": f, "activation": 2.0 + f}],
             "interval_examples": [{"low": 0.0, "high": 1.0, "examples": []}],
             "top_logits": [["tok", 1.5]], "bottom_logits": [["neg", -1.5]]}
            for f in range(info.d_sae)]
    store_run(info, AnalyzeConfig(tokens=4096, context_size=32, params={"note": "x"}), 4096, rows)
    add_label(ref, 3, "travel and journeys", author="ann")
    add_label(ref, 3, "trains and travel", author="bob")
    lab = add_label(ref, 3, "movement words", method="heuristic", model="saereg-heuristic-v1")
    set_status(lab.id, "accepted")
    add_label(ref, 7, "numbers in code", author="ann")


def home_version(ref: str):
    return Catalog().get(ref)


def _labels_and_stats(ref: str):
    from saereg.analysis.labels import history
    from saereg.analysis.stats import feature_stats

    info = home_version(ref)
    labels = {}
    for f in range(info.d_sae):
        hist = history(ref, f)
        pos = {lab.id: j for j, lab in enumerate(hist)}
        labels[f] = [(lab.text, lab.method, lab.model, lab.status, lab.author,
                      lab.created_at.replace(tzinfo=None), lab.detection_score,
                      pos.get(lab.supersedes)) for lab in hist]
    _, run, _ = feature_stats(ref, 0)
    stats = []
    for f in range(info.d_sae):
        row = feature_stats(ref, f)[2]
        stats.append({c: getattr(row, c) for c in (
            "firing_rate", "mean_activation", "max_activation", "flag", "histogram",
            "top_examples", "interval_examples", "top_logits", "bottom_logits")})
    provenance = (run.dataset, run.tokens, run.context_size, run.code_version, run.created_by,
                  run.params["note"])
    return labels, stats, provenance


def test_labels_and_statistics_round_trip(hub, home, tmp_path, mlflow_template, monkeypatch):
    from saereg.analysis.search import search_labels
    from saereg.analysis.semantic import search_meaning

    _study("tiny@1")
    mine = _labels_and_stats("tiny@1")
    assert len(mine[0][3]) == 3 and mine[0][3][1][-1] == 0  # bob's label supersedes ann's
    push("tiny@1", REPO)
    import io

    import pyarrow.parquet as pq
    table = pq.read_table(io.BytesIO(hub.files(REPO)["tiny/features.parquet"]))
    assert table.column("label").to_pylist()[3] == "movement words"  # the accepted one
    assert table.column("label").to_pylist()[7] == "numbers in code"
    assert table.column("max_activation").to_pylist()[:3] == [2.0, 3.0, 4.0]
    assert json.loads(table.schema.metadata[b"saereg.stats_run"])["tokens"] == 4096

    switch_home(tmp_path / "other-home", mlflow_template, monkeypatch)
    result = sh("sync", "pull", f"{REPO}@tiny-v1")
    assert result.exit_code == 0, result.output
    assert "registered as tiny@1 (4 labels, statistics over 4,096 tokens)" in result.output
    theirs = _labels_and_stats("tiny@1")
    assert theirs[0] == mine[0]
    assert theirs[1] == mine[1]
    assert theirs[2] == mine[2]
    [hit] = search_labels("journeys")  # the pulled history is searchable (full-text index)
    assert (hit.feature_index, hit.ref) == (3, "tiny@1")
    assert "embedded 4 labels for search by meaning" in result.output  # and by meaning
    assert search_meaning("a trip by rail")[0].feature_index == 3
    counts = table_counts()
    [again] = pull(f"{REPO}@tiny-v1")
    assert not again.added and table_counts() == counts


def _set(path: str, value):
    """A change to a FeatureExport: ``path`` is 'stats.5.firing_rate', 'labels.3.1.status',
    'rates.5' or 'run.tokens' (list positions and dict keys, dots between)."""
    def change(export):
        root, *keys = path.split(".")
        target = {"stats": export.stats, "labels": export.labels, "rates": export.log10_rates,
                  "run": export.stats_run}[root]
        for key in keys[:-1]:
            target = target[int(key) if isinstance(target, list) else key]
        last = keys[-1]
        target[int(last) if isinstance(target, list) else last] = value
    return change


BAD_FEATURES = {
    # what is changed -> the error's words
    "status": (_set("labels.3.1.status", "maybe"),
               "feature 3 has a label with method 'human' / status 'maybe'"),
    "nan-rate": (_set("stats.5.firing_rate", float("nan")),
                 "feature 5: firing_rate is not a finite number (nan)"),
    "rate-above-1": (_set("stats.5.firing_rate", 1.5),
                     "feature 5: firing_rate must lie in [0.0, 1.0], not 1.5"),
    "inf-max": (_set("stats.9.max_activation", float("inf")),
                "feature 9: max_activation is not a finite number (inf)"),
    "log10-inf": (_set("rates.2", float("inf")),
                  "feature 2: log10_firing_rate must be at most 0 (or -inf), not inf"),
    "flag": (_set("stats.4.flag", "<b>x</b>"),
             "feature 4: flag must be 'dead', 'dense' or null, not '<b>x</b>'"),
    "peak": (_set("stats.6.top_examples.0.peak", 9),
             "feature 6: top example 0: peak must be an integer in 0..1, not 9"),
    "acts": (_set("stats.6.top_examples.0.acts", [1.0]),
             "feature 6: top example 0: acts has 1 values for 2 tokens"),
    "token": (_set("stats.6.top_examples.0.tokens", ["a", 5]),
              "feature 6: top example 0: a token must be a string, not int"),
    "example": (_set("stats.6.top_examples", [["a", "b"]]),
                "feature 6: top example 0 must be an object, not list"),
    "examples-not-a-list": (_set("stats.6.top_examples", 0),
                            "feature 6: top_examples must be a list, not int"),
    "histogram": (_set("stats.1.histogram", {"counts": [1]}),
                  "feature 1: histogram lacks 'log10_low', 'log10_high'"),
    "logits": (_set("stats.1.top_logits", [["tok"]]),
               "feature 1: top_logits must hold [token, value] pairs"),
    "nul-label": (_set("labels.7.0.text", "numbers\x00in code"),
                  "feature 7: label 0 may not hold control characters (found '\\x00')"),
    "long-author": (_set("labels.7.0.created_by", "a" * 200),
                    "feature 7: label 0 created_by is 200 characters long; at most 128"),
    "time": (_set("labels.7.0.created_at", "yesterday"),
             "feature 7: label 0 created_at is not an ISO 8601 time ('yesterday')"),
    "score": (_set("labels.7.0.detection_score", float("nan")),
              "feature 7: label 0 detection_score is not a finite number (nan)"),
    "supersedes": (_set("labels.7.0.supersedes", 0),
                   "feature 7 has a label that supersedes position 0, which is not an earlier"),
    "run-tokens": (_set("run.tokens", -1),
                   "the stats run: tokens must be an integer in 0..")}


def test_features_published_after_the_push_reach_a_catalog_that_has_the_version(
        hub, home, tmp_path, mlflow_template, monkeypatch):
    """Labels and a stats run added after a version was pushed: `sync push --features` puts
    them on main in one commit (the version's tag keeps its files); a catalog that pulled the
    version from its tag gets what is new from a pull of that commit (labels with authors,
    times and what they supersede, the stats run), and a second pull adds nothing. A second
    `--features` with nothing new is a no-op; once another version was pushed to the folder,
    the first one's features are refused there; a version never pushed is refused."""
    from saereg.analysis.labels import add_label
    from saereg.analysis.stats import AnalyzeConfig, store_run
    from saereg.registry.hub.features_push import push_features

    _study("tiny@1")
    first = push("tiny@1", REPO)
    add_label("tiny@1", 3, "rail journeys", author="cy")  # a fourth label of feature 3
    add_label("tiny@1", 9, "colours and paint", author="cy")
    rows = [{"feature_index": f, "firing_rate": 0.5, "mean_activation": 1.0,
             "max_activation": 3.0, "flag": None,
             "histogram": {"log10_low": -4.0, "log10_high": 4.0, "counts": [1]},
             "top_examples": [], "interval_examples": [], "top_logits": [],
             "bottom_logits": []} for f in range(64)]
    store_run(home_version("tiny@1"), AnalyzeConfig(tokens=8192, context_size=32,
                                                 params={"note": "y"}), 8192, rows)
    mine = _labels_and_stats("tiny@1")

    result = sh("sync", "push", "tiny@1", "--repo", REPO, "--features")
    assert result.exit_code == 0, result.output
    assert "tiny@1: features published at acme/tiny-saes/tiny on main" in result.output
    again = push_features("tiny@1", REPO)
    assert again.skipped and result.output.split("commit ")[1].startswith(again.commit[:12])
    update = again.commit
    at_tag = hub.files(REPO, "tiny-v1")["tiny/features.parquet"]
    assert at_tag == hub.files(REPO, first.commit)["tiny/features.parquet"]  # tag unchanged
    assert hub.files(REPO, update)["tiny/features.parquet"] != at_tag
    assert (hub.files(REPO, update)["tiny/sae_weights.safetensors"]
            == hub.files(REPO, "tiny-v1")["tiny/sae_weights.safetensors"])

    add_label("tiny@1", 9, "paint colours", author="cy")  # main moves before the commit:
    hub.state.before_next("commit", lambda: hub.state.put_files(REPO, {"NOTES.md": b"x"}))
    with pytest.raises(HubError, match="main of acme/tiny-saes moved while it ran .another "
                                       "commit landed first.; nothing was changed, run it again"):
        push_features("tiny@1", REPO)  # refused by the Hub, nothing of it on main
    assert hub.files(REPO)["tiny/features.parquet"] == hub.files(REPO, update)[
        "tiny/features.parquet"]
    retried = push_features("tiny@1", REPO)  # on the new head
    assert not retried.skipped and "NOTES.md" in hub.files(REPO, retried.commit)
    mine = _labels_and_stats("tiny@1")
    update = retried.commit

    push("tiny@2", REPO, path="tiny")  # main's folder now holds version 2
    with pytest.raises(HubError, match=r"holds other SAE files than tiny@1 now \(tiny@2, by "):
        push_features("tiny@1", REPO)
    with pytest.raises(UsageError, match="tiny@2 was not pushed to acme/tiny-saes/elsewhere"):
        push_features("tiny@2", REPO, path="elsewhere")

    switch_home(tmp_path / "other-home", mlflow_template, monkeypatch)
    [old] = pull(f"{REPO}@tiny-v1")
    assert old.added and old.labels == 4
    result = sh("sync", "pull", f"{REPO}@{update}")
    assert result.exit_code == 0, result.output
    assert ("already in the catalog as tiny@1 (3 new labels, new statistics over 8,192 "
            "tokens)") in result.output
    # the 3 new labels, and the 4 of the first pull (through the API, which embeds nothing)
    assert "embedded 7 labels for search by meaning" in result.output
    theirs = _labels_and_stats("tiny@1")
    assert theirs[0] == mine[0]  # whole histories: texts, authors, times, supersedes
    assert theirs[1] == mine[1] and theirs[2][:3] == mine[2][:3]  # the newest stats run
    counts = table_counts()
    [same] = pull(f"{REPO}@{update}")
    assert not same.added and same.labels == 0 and same.stats_tokens is None
    assert table_counts() == counts


def test_merging_features_finds_the_labels_a_version_has(catalog, tmp_path):
    """On SQLite and PostgreSQL (whose times come back in the session's zone): merging a
    version's own exported features adds nothing; a label added to the export after the
    catalog's newest is recorded once, superseding the catalog's copy of the label it names;
    a label without a time matches its copy by the rest."""
    from saereg.analysis.labels import add_label, history
    from saereg.registry.hub import features as hub_features

    catalog.register_folder(make_sae_folder(tmp_path / "m"), "m")
    info = catalog.get("m@1")
    add_label("m@1", 3, "travel and journeys", author="ann")
    add_label("m@1", 3, "trains and travel", author="bob")
    with catalog.session() as s:
        export = hub_features.collect(s, info.id, info.d_sae)

    def merge(e):
        return catalog.add_feature_data(
            "m@1", lambda s, vid: hub_features.merge(s, vid, e, source="test"), what="merging")

    assert merge(export).labels == 0
    export.labels[3].append({**export.labels[3][1], "text": "rail journeys", "created_by": "cy",
                             "created_at": "2030-01-01T00:00:00+00:00", "supersedes": 1})
    export.labels[3][0]["created_at"] = None
    assert merge(export).labels == 1 and merge(export).labels == 0
    hist = history("m@1", 3)
    assert [(h.text, h.author) for h in hist] == [("travel and journeys", "ann"),
                                                 ("trains and travel", "bob"),
                                                 ("rail journeys", "cy")]
    assert hist[2].supersedes == hist[1].id


def _export():
    """A FeatureExport of 12 latents shaped as analyze and the label commands write them."""
    from saereg.registry.hub.features import FeatureExport

    def example(f):
        return {"tokens": ["a", "b"], "acts": [0.0, 2.0 + f], "peak": 1, "window": f,
                "position": 1, "token_ids": [7, 8], "doc_id": f"d{f}", "doc_offset": f,
                "activation": 2.0 + f}

    def label(text, j=None):
        return {"text": text, "method": "human", "model": None, "status": "candidate",
                "detection_score": None, "created_at": "2026-01-02T03:04:05+00:00",
                "created_by": "ann", "supersedes": j}

    stats = [{"firing_rate": f / 1000, "mean_activation": 0.5 + f, "max_activation": 2.0 + f,
              "flag": None, "histogram": {"log10_low": -4.0, "log10_high": 4.0,
                                          "counts": [f, 1, 0]},
              "top_examples": [example(f)],
              "interval_examples": [{"low": 0.0, "high": 1.0, "examples": [example(f)]}],
              "top_logits": [["tok", 1.5]], "bottom_logits": [["neg", -1.5]]}
             for f in range(12)]
    labels = [[] for _ in range(12)]
    labels[3] = [label("travel and journeys"), label("trains and travel", 0)]
    labels[7] = [label("numbers in code")]
    return FeatureExport(d_sae=12, log10_rates=[-3.0] * 11 + [float("-inf")],
                         stats_run={"dataset": "tiny", "tokens": 4096, "context_size": 32,
                                    "params": {}, "created_at": "2026-01-02T03:04:05+00:00",
                                    "created_by": "ann", "code_version": "1"},
                         stats=stats, labels=labels)


def test_a_good_features_file_reads_back_whole(tmp_path):
    """The export every bad case below starts from is accepted as it is (a dead latent's
    log10 rate of -inf included), so each case's error comes from its one change."""
    from saereg.registry.hub import features as hub_features

    path = tmp_path / "features.parquet"
    hub_features.write(path, _export())
    back = hub_features.read(path, 12)
    assert back.stats == _export().stats and back.labels == _export().labels
    assert back.log10_rates[11] == float("-inf")
    partial = _export()  # null fields of a statistics row stand for the catalog's defaults
    partial.stats[2].update(histogram=None, top_examples=None, mean_activation=None)
    hub_features.write(path, partial)
    assert hub_features.read(path, 12).stats[2]["histogram"] is None


@pytest.mark.parametrize("case", sorted(BAD_FEATURES))
def test_a_bad_features_file_is_refused_by_feature_and_field(tmp_path, case):
    from saereg.registry.hub import features as hub_features

    export = _export()
    change, words = BAD_FEATURES[case]
    change(export)
    path = tmp_path / "features.parquet"
    hub_features.write(path, export)
    with pytest.raises(SAEFormatError, match=re.escape(f"features.parquet: {words}")):
        hub_features.read(path, 12)


@pytest.mark.parametrize("case", ["status", "nul-label"])
def test_a_bad_features_file_on_pull_records_nothing(hub, home, tmp_path, mlflow_template,
                                                      monkeypatch, case):
    """features.parquet from elsewhere holding what the catalog cannot keep or its pages
    cannot show (here: a status no label has; a label with a NUL, which PostgreSQL refuses in
    text): one error naming the feature and the field, from the CLI with exit code 1, and the
    pull records nothing."""
    import pyarrow.parquet as pq

    from saereg.registry.hub import features as hub_features

    _study("tiny@1")
    push("tiny@1", REPO)
    export = hub_features.read(_fetch(hub, "tiny/features.parquet", tmp_path), 64)
    change, words = BAD_FEATURES[case]
    change(export)
    bad = tmp_path / "bad.parquet"
    hub_features.write(bad, export)
    assert pq.read_table(bad).column("labels").type.value_type == hub_features._label_type()
    _upload_over(hub, "tiny", bad, tmp_path)
    switch_home(tmp_path / "other-home", mlflow_template, monkeypatch)
    with pytest.raises(SAEFormatError, match=re.escape(f"features.parquet: {words}")):
        pull(f"{REPO}@main")
    result = sh("sync", "pull", f"{REPO}@main")
    assert result.exit_code == 1 and words in result.output, result.output
    assert table_counts()["sae_versions"] == 0 and table_counts()["feature_labels"] == 0
    assert table_counts()["stats_runs"] == 0 and not publications()


def test_features_file_that_is_not_json_inside_records_nothing(hub, home, tmp_path,
                                                               mlflow_template, monkeypatch):
    """A JSON column holding text that is not JSON, and stats-run metadata that is not an
    object: each refused by name before anything is recorded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _study("tiny@1")
    push("tiny@1", REPO)
    table = pq.read_table(_fetch(hub, "tiny/features.parquet", tmp_path))
    column = table.column("histogram").to_pylist()
    column[11] = "{not json"
    broken = table.set_column(table.column_names.index("histogram"), "histogram",
                              pa.array(column, pa.string()))
    bad = tmp_path / "bad.parquet"
    pq.write_table(broken, bad)
    _upload_over(hub, "tiny", bad, tmp_path)
    switch_home(tmp_path / "other-home", mlflow_template, monkeypatch)
    with pytest.raises(SAEFormatError, match="features.parquet: feature 11: histogram is not "
                                             "JSON"):
        pull(f"{REPO}@main")
    meta = table.replace_schema_metadata({b"saereg.stats_run": b"[1, 2]"})
    pq.write_table(meta, bad)
    _upload_over(hub, "tiny", bad, tmp_path)
    with pytest.raises(SAEFormatError, match=r"the stats run \(schema metadata\) must be an "
                                             "object, not list"):
        pull(f"{REPO}@main")
    assert table_counts()["sae_versions"] == 0 and table_counts()["stats_runs"] == 0


def _fetch(hub, name: str, tmp_path):
    path = tmp_path / name.replace("/", "_")
    path.write_bytes(hub.files(REPO)[name])
    return path


def _upload_over(hub, folder: str, features, tmp_path) -> None:
    """Replace features.parquet and its sha256 in registry.json on main, through the client."""
    import hashlib

    from huggingface_hub import HfApi

    record = json.loads(hub.files(REPO)[f"{folder}/registry.json"])
    record["files"]["features.parquet"]["sha256"] = hashlib.sha256(
        features.read_bytes()).hexdigest()
    reg = tmp_path / "registry.json"
    reg.write_text(json.dumps(record))
    api = HfApi()
    api.upload_file(path_or_fileobj=str(features), path_in_repo=f"{folder}/features.parquet",
                    repo_id=REPO)
    api.upload_file(path_or_fileobj=str(reg), path_in_repo=f"{folder}/registry.json",
                    repo_id=REPO)


def test_features_parquet_matches_the_catalog(hub, home):
    push("tiny@1", REPO)
    import io

    import pyarrow.parquet as pq
    table = pq.read_table(io.BytesIO(hub.files(REPO)["tiny/features.parquet"]))
    assert table.column_names[:2] == ["feature_index", "log10_firing_rate"]
    rows = list(zip(table.column(0).to_pylist(), table.column(1).to_pylist()))
    assert rows == features_of(home.get("tiny@1").id) and len(rows) == 64


def test_load_hf_ref_pinned_and_offline(hub, home, monkeypatch):
    push("tiny@1", REPO)
    push("tiny@2", REPO)
    ref = f"hf://{REPO}/tiny@tiny-v1"
    sae = load_sae(ref)
    assert torch.equal(sae.W_dec, load_sae("tiny@1").W_dec)
    assert not torch.equal(sae.W_dec, load_sae(f"hf://{REPO}/tiny").W_dec)  # main is v2
    import huggingface_hub.constants as c
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    hub.stop()
    assert torch.equal(load_sae(ref).W_dec, sae.W_dec)
    with pytest.raises(HubError, match="not in the local huggingface_hub cache"):
        load_sae(f"hf://{REPO}/tiny@tiny-v9")


def test_sae_lens_loads_the_pulled_folder(hub, home):
    sae_lens = pytest.importorskip("sae_lens")
    push("tiny@1", REPO)
    from saereg.registry.hub.sync import download_ref
    folder, _ = download_ref(f"hf://{REPO}/tiny@tiny-v1")
    theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    ours = load_sae(f"hf://{REPO}/tiny@tiny-v1")
    x = torch.randn(32, 16)
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), ours.encode(x), atol=1e-5)
        assert torch.allclose(theirs.decode(ours.encode(x)), ours.decode(ours.encode(x)),
                              atol=1e-5)


@pytest.mark.parametrize("repo", ["acme/../etc", "../acme/x", "acme/x/y", "acme/na me",
                                  "acme/x;rm", "acme", "acme/--x", "/acme/x"])
def test_bad_repo_ids_are_refused_before_any_request(hub, home, repo):
    result = sh("sync", "push", "tiny@1", "--repo", repo)
    assert result.exit_code == 2 and "invalid Hub repo id" in result.output
    with pytest.raises(UsageError):
        pull(repo)
    if repo.count("/") == 1 and not repo.startswith("/"):  # hf:// takes the first two parts
        with pytest.raises(UsageError):
            load_sae(f"hf://{repo}/x")
    assert hub.state.requests == [] and publications() == []


def test_bad_paths_and_revisions(hub, home):
    for path in ("../x", "a/../../b", "a//b", "a b"):
        result = sh("sync", "push", "tiny@1", "--repo", REPO, "--path", path)
        assert result.exit_code == 2 and "invalid path" in result.output
    push("tiny@1", REPO)
    result = sh("sync", "pull", f"{REPO}@no-such-tag")
    assert result.exit_code == 1
    assert "unknown revision 'no-such-tag'" in result.output and "Traceback" not in result.output
    with pytest.raises(NotFoundError, match="unknown Hub repo 'acme/nothing'"):
        pull("acme/nothing")
    with pytest.raises(NotFoundError, match="SAE folder"):
        pull(REPO, path="elsewhere")
    assert [p[0] for p in publications()] == ["push"]


def test_checksum_mismatch_on_pull_records_nothing(hub, home, tmp_path, mlflow_template,
                                                   monkeypatch):
    push("tiny@1", REPO)
    weights = bytearray(hub.files(REPO)["tiny/sae_weights.safetensors"])
    weights[-1] ^= 0xFF
    hub.state.tamper(REPO, "tiny/sae_weights.safetensors", bytes(weights))
    switch_home(tmp_path / "other-home", mlflow_template, monkeypatch)
    Catalog().list()  # creates the empty catalog
    counts = table_counts()
    result = sh("sync", "pull", REPO)
    assert result.exit_code == 1
    assert "checksum mismatch for sae_weights.safetensors" in result.output
    assert table_counts() == counts and set(counts.values()) == {0}
    with pytest.raises(ChecksumError):
        load_sae(f"hf://{REPO}/tiny")


@pytest.mark.parametrize("route", ["commit", "tag"])
def test_server_error_mid_upload_then_retry(hub, home, route):
    """The weights reached the server through LFS; then the commit (or the tag) failed."""
    hub.state.fail_next(route)
    result = sh("sync", "push", "tiny@1", "--repo", REPO)
    assert result.exit_code == 1 and "500" in result.output
    assert result.output.count("Error: ") == 1 and "Traceback" not in result.output
    assert SECRET not in result.output
    assert ("PUT", "lfs-upload") in hub.state.requests
    assert publications() == []
    hub.state.failures.clear()
    result = sh("sync", "push", "tiny@1", "--repo", REPO)
    assert result.exit_code == 0, result.output
    [(_, _, _, rev, commit)] = publications()
    assert hub.state.repos[REPO].tags[rev] == commit
    assert "tiny/sae_weights.safetensors" in hub.files(REPO, rev)


def test_token_is_sent_but_never_kept(hub, home, caplog):
    import logging
    caplog.set_level(logging.DEBUG)
    push("tiny@1", REPO)
    hub.state.fail_next("commit")
    with pytest.raises(HubError) as err:
        push("tiny@2", REPO)
    assert f"Bearer {SECRET}" in hub.state.auth_headers
    assert SECRET not in str(err.value) and SECRET not in caplog.text
    for content in hub.files(REPO).values():
        assert SECRET.encode() not in content
    from saereg.registry.paths import saereg_home
    for f in saereg_home().rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_help_does_not_import_the_hub_client():
    import subprocess
    code = ("import sys; from click.testing import CliRunner; from saereg.commands.main import cli; "
            "r = CliRunner().invoke(cli, ['sync', '--help']); assert r.exit_code == 0, r.output; "
            "bad = [m for m in ('torch', 'mlflow', 'huggingface_hub', 'transformers') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tag_left_by_an_unrecorded_push_is_recorded_not_repushed(hub, home):
    first = push("tiny@1", REPO, private=True)
    assert hub.state.repos[REPO].private
    with db.session() as s:  # as if the process died between the tag and the catalog write
        s.query(Publication).delete()
        s.commit()
    commits = len(hub.state.repos[REPO].commits)
    again = push("tiny@1", REPO)
    assert (again.commit, again.revision, again.skipped) == (first.commit, "tiny-v1", False)
    assert len(hub.state.repos[REPO].commits) == commits and len(publications()) == 1
    with db.session() as s:
        s.query(Publication).delete()
        s.commit()
    with pytest.raises(HubError, match="tag tiny-v1 already exists .* different files"):
        push("tiny@1", REPO, path="elsewhere")  # same tag, but its files are not at this path
    assert publications() == []


def test_pull_a_plain_saelens_repo(hub, home, tmp_path):
    """A repo without registry.json (as most SAE releases are): registered with provenance."""
    from catalog_helpers import make_sae_folder
    from huggingface_hub import HfApi

    stage = tmp_path / "stage"
    make_sae_folder(stage / "blocks.6.hook_resid_post", model="gpt2", hook="blocks.6", seed=3)
    api = HfApi(endpoint=hub.url)
    api.create_repo("someone/gpt2-saes")
    commit = api.upload_folder(repo_id="someone/gpt2-saes", folder_path=str(stage)).oid
    [pulled] = pull("someone/gpt2-saes")
    v = home.get(pulled.ref)
    assert pulled.ref == "blocks.6.hook_resid_post@1" and v.model == "gpt2"
    assert v.source_uri == f"hf://someone/gpt2-saes/blocks.6.hook_resid_post@{commit}"
    assert v.tags["hub.commit"] == commit and "hub.version" not in v.tags
    assert [p.added for p in pull("someone/gpt2-saes")] == [False]
