"""Search by meaning, on SQLite and PostgreSQL, with the packaged all-MiniLM-L6-v2 (loaded once
per test process): every label written through the library gets its 384 float32 embedding in
the same transaction; the query "time travel" finds the feature labelled "wormholes and
temporal paradoxes" ahead of unrelated labels; the filters of word search apply (SAE, model,
firing rate) and so does its current-label rule (rejected labels never match, an older label
that matched is named); hybrid mode is the reciprocal rank fusion of the word and meaning
lists; the same query over every SAE of a model is grouped by version (library, CLI and API);
labels written without an embedding are found only after `saereg labels embed`, which reports
progress and adds nothing the second time; the in-process index picks up labels written after
it was built; empty and over-long queries are one clear error (exit 2 on the CLI, 422 on the
API) and `--meaning` with `--hybrid` is refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from catalog_helpers import error_line
from feature_helpers import register_tiny_sae

from saereg.analysis import labels, semantic
from saereg.analysis.embed import EMBED_DIM, EMBED_MODEL, embed, progress_line, vectors_for
from saereg.analysis.search import search_labels
from saereg.commands.main import cli
from saereg.registry.catalog import db
from saereg.registry.catalog.feature_schema import FeatureLabel, LabelEmbedding
from saereg.registry.errors import ConfigError, UsageError

TOPICS = {3: "wormholes and temporal paradoxes", 4: "closing parentheses in code",
          5: "Mentions of travelling by train", 6: "cooking recipes and kitchen utensils",
          7: "numbers in financial reports", 8: "the letter q at the start of words"}


def stored() -> dict[int, tuple[str, int, bytes]]:
    with db.session() as s:
        return {r.label_id: (r.model, r.dim, r.vector) for r in s.scalars(select(LabelEmbedding))}


def test_meaning_search_finds_time_travel(tiny_sae):
    made = labels.add_labels(tiny_sae, sorted(TOPICS.items()))
    vecs = stored()
    assert set(vecs) == {lab.id for lab in made}
    model, dim, raw = vecs[made[0].id]
    v = np.frombuffer(raw, "<f4")
    assert (model, dim, len(raw), v.shape) == (EMBED_MODEL, EMBED_DIM, 4 * EMBED_DIM, (384,))
    assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(v, embed([TOPICS[3]])[0], atol=1e-5)

    hits = semantic.search_meaning("time travel")
    assert [h.feature_index for h in hits][0] == 3 and len(hits) == len(TOPICS)
    assert hits[0].label == TOPICS[3] and hits[0].matched is None and hits[0].ref == tiny_sae
    assert all(hits[0].rank > h.rank + 0.1 for h in hits[1:])  # clearly ahead
    assert [h.rank for h in hits] == sorted((h.rank for h in hits), reverse=True)
    assert search_labels("time travel") == []  # no word of the query is in the label
    assert [h.feature_index for h in semantic.search_meaning("cuisine", limit=1)] == [6]
    assert semantic.search_meaning("time travel", sae="other-sae") == []
    assert semantic.search_meaning("time travel", model="other-model") == []
    assert len(semantic.search_meaning("time travel", sae="tiny-sae", limit=2)) == 2

    # the current-label rule: a newer label shows, the older one that matched is named
    labels.add_label(tiny_sae, 3, "the colour of the sky")  # written after the index was built
    [top] = semantic.search_meaning("time travel", limit=1)
    assert (top.feature_index, top.label, top.matched) == (3, "the colour of the sky", TOPICS[3])
    blue = semantic.search_meaning("blue sky", limit=1)[0]
    assert (blue.feature_index, blue.matched) == (3, None)
    labels.set_status(made[0].id, "rejected")  # rejected labels never match
    hits = semantic.search_meaning("time travel")
    assert hits[0].feature_index == 5 and all(h.matched != TOPICS[3] for h in hits)
    assert len({(h.ref, h.feature_index) for h in hits}) == len(hits)  # each feature once


def test_hybrid_is_the_fusion_of_both_ranks(tiny_sae):
    labels.add_labels(tiny_sae, sorted(TOPICS.items()) + [(9, "time of travel bookings")])
    words = search_labels("time travel", limit=50)
    meaning = semantic.search_meaning("time travel", limit=50)
    assert [h.feature_index for h in words] == [9]
    expected = {}
    for ranked in (meaning, words):
        for r, h in enumerate(ranked, 1):
            expected[h.feature_index] = expected.get(h.feature_index, 0) + 1 / (60 + r)
    hybrid = semantic.search_meaning("time travel", hybrid=True, limit=5)
    assert [h.feature_index for h in hybrid] == sorted(expected, key=lambda i: -expected[i])[:5]
    assert hybrid[0].feature_index == 9  # in both lists
    assert [h.rank for h in hybrid] == pytest.approx([expected[h.feature_index] for h in hybrid])


def test_across_saes_grouped_and_rate_filters(tiny_sae, tiny_model_dir, tmp_path):
    from saereg.analysis.stats import AnalyzeConfig, analyze, feature_stats

    other = register_tiny_sae(tiny_model_dir, tmp_path, name="tiny-b", seed=1)
    labels.add_labels(tiny_sae, sorted(TOPICS.items()))
    labels.add_labels(other, [(1, "journeys through time"), (2, "prices of groceries")])
    model = str(tiny_model_dir)
    groups = semantic.search_meaning_grouped("time travel", model=model, limit=1)
    assert [(g.ref, [h.feature_index for h in g.hits]) for g in groups] in (
        [(tiny_sae, [3]), (other, [1])], [(other, [1]), (tiny_sae, [3])])
    assert all(g.hook == "model.layers.1" for g in groups)
    assert groups[0].hits[0].rank >= groups[1].hits[0].rank
    assert semantic.search_meaning_grouped("time travel", model=model, hook="nope") == []

    r = CliRunner().invoke(cli, ["search", "--meaning", "time travel", "--model", model,
                                 "--limit", "2"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    heads = [line for line in lines if line.startswith("== ")]
    assert sorted(heads) == sorted([f"== {tiny_sae}\tmodel.layers.1", f"== {other}\tmodel.layers.1"])
    assert len(lines) == 2 + 4
    r = CliRunner().invoke(cli, ["search", "--hybrid", "time travel", "--sae", "tiny-b"])
    assert r.exit_code == 0 and r.output.splitlines()[0].startswith(f"{other}\t1\t"), r.output

    analyze(tiny_sae, AnalyzeConfig(tokens=256, context_size=32), progress=False)
    rates = {i: feature_stats(tiny_sae, i)[2].firing_rate for i in TOPICS}
    lo = sorted(rates.values())[len(rates) // 2]
    hits = semantic.search_meaning("time travel", sae="tiny-sae", min_rate=lo)
    assert {h.feature_index for h in hits} == {i for i, rate in rates.items() if rate >= lo}
    assert all(h.firing_rate == rates[h.feature_index] for h in hits)
    hits = semantic.search_meaning("time travel", max_rate=lo)  # tiny-b has no stats: left out
    assert {(h.ref, h.feature_index) for h in hits} == {
        (tiny_sae, i) for i, rate in rates.items() if rate <= lo}


def test_backfill_embeds_labels_written_without_one(tiny_sae):
    labels.add_label(tiny_sae, 4, TOPICS[4])
    with db.session(write=True) as s:  # as a hub pull or a pre-0005 catalog leaves them
        vid = s.scalar(select(FeatureLabel.version_id))
        s.add_all(FeatureLabel(version_id=vid, feature_index=i, text=t, method="human",
                               status="candidate", created_by="bob")
                  for i, t in ((3, TOPICS[3]), (6, TOPICS[6])))
    assert semantic.unembedded() == 2
    assert [h.feature_index for h in semantic.search_meaning("time travel")] == [4]
    r = CliRunner().invoke(cli, ["labels", "embed", "--sae", tiny_sae])
    assert r.exit_code == 0, r.output
    assert "embedding labels: 2/2" in r.output and r.output.rstrip().endswith(
        f"2 labels embedded with {EMBED_MODEL}")
    assert semantic.unembedded() == 0 and len(stored()) == 3
    assert semantic.search_meaning("time travel")[0].feature_index == 3
    r = CliRunner().invoke(cli, ["labels", "embed"])
    assert r.exit_code == 0 and r.output.rstrip().endswith("0 labels embedded with "
                                                           f"{EMBED_MODEL}"), r.output
    r = CliRunner().invoke(cli, ["labels", "embed", "--sae", "nope@1"])
    assert r.exit_code == 1 and "nope" in error_line(r)


def test_embedding_progress_line():
    """Long embedding work reports done/total, labels/s and an ETA, throttled, and always its
    last batch; the labels' own writer passes its progress through."""
    calls = []
    texts = [f"label number {i}" for i in range(150)]
    vectors = vectors_for(texts, lambda done, total: calls.append((done, total)))
    assert len(vectors) == 150 and calls == [(64, 150), (128, 150), (150, 150)]
    out = io.StringIO()
    line = progress_line(out, every_s=3600)
    for done, total in calls:
        line(done, total)
    first, last = out.getvalue().splitlines()  # the middle call falls within every_s
    assert first.startswith("embedding labels: 64/150, ") and "labels/s, ETA " in first
    assert last.startswith("embedding labels: 150/150, ") and "ETA" not in last


def test_bad_input_is_one_clear_error(tiny_sae):
    labels.add_label(tiny_sae, 3, TOPICS[3])
    for bad in ("", "   ", None):
        with pytest.raises(UsageError, match="needs a query"):
            semantic.search_meaning(bad)
    with pytest.raises(UsageError, match="at most 1000 characters, got 1001"):
        semantic.search_meaning("x" * 1001)
    with pytest.raises(UsageError, match="at most 1000"):
        semantic.search_meaning_grouped("y" * 2000, model="m")
    with pytest.raises(UsageError, match="limit must be positive"):
        semantic.search_meaning("time", limit=0)
    with pytest.raises(ConfigError, match="min_rate 0.5 is above max_rate 0.1"):
        semantic.search_meaning("time", min_rate=0.5, max_rate=0.1)
    with pytest.raises(ConfigError, match="max_rate must be"):
        semantic.search_meaning("time", max_rate=float("nan"))
    runner = CliRunner()
    assert "needs a query" in error_line(runner.invoke(cli, ["search", "--meaning", " "]), 2)
    assert "at most 1000" in error_line(runner.invoke(cli, ["search", "--hybrid", "z" * 1200]), 2)
    assert "not both" in error_line(runner.invoke(cli, ["search", "--meaning", "--hybrid", "t"]), 2)
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(LabelEmbedding)) == 1


def test_api_search_by_meaning(tiny_sae, tiny_model_dir):
    from fastapi.testclient import TestClient

    from saereg.analysis.web.app import create_app

    labels.add_labels(tiny_sae, sorted(TOPICS.items()))
    c = TestClient(create_app(), base_url="http://127.0.0.1:8000")
    body = c.get("/api/search", params={"q": "time travel", "mode": "meaning"}).json()
    assert body["mode"] == "meaning" and body["groups"] is None
    assert body["hits"][0]["index"] == 3 and body["hits"][0]["label"] == TOPICS[3]
    body = c.get("/api/search", params={"q": "time travel", "mode": "hybrid",
                                        "model": str(tiny_model_dir), "limit": 2}).json()
    [group] = body["groups"]
    assert (group["ref"], group["sae"], group["version"]) == (tiny_sae, "tiny-sae", 1)
    assert [h["index"] for h in group["hits"]] == [h["index"] for h in body["hits"]]
    assert len(body["hits"]) == 2 and body["hits"][0]["index"] == 3
    r = c.get("/api/search", params={"q": "q" * 1001, "mode": "meaning"})
    assert r.status_code == 422 and "at most 1000" in r.json()["detail"]
    assert c.get("/api/search", params={"q": "t", "mode": "nope"}).status_code == 422
    page = c.get("/search", params={"q": "time travel", "mode": "meaning"}).text
    assert TOPICS[3] in page and f'/sae/{tiny_sae}/feature/3"' in page
    page = c.get("/search", params={"q": "time travel", "mode": "meaning",
                                    "model": str(tiny_model_dir)}).text
    assert 'class="group"' in page and TOPICS[3] in page
