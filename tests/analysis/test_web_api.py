"""`saereg serve` through its HTTP interface, on a real catalog (SQLite, and PostgreSQL when
SAEREG_TEST_POSTGRES_URL is set) holding two versions of a TopK SAE on the tiny LLaMA with a
stats run and labels: every page and its JSON twin show the same data (the SAE list and its
filters, a version, a diff, a feature dashboard with one histogram bar per stored bin and every
top example, search hits that link to feature pages, the OpenAPI document and our own docs
page, with nothing loaded from another host); unknown references and indices are 404 or 422
with the catalog's one-line message on pages and API alike; the live prompt streams one event
per token whose features are those `explain-prompt` finds, and keeps the model and the SAE
loaded across requests; steering streams both sides, stores the run (hand-picked features as
the version's scratch preset, reused while they do not change) and the stored run reproduces
with the library's `steer`; over-long prompts, too many new tokens and non-finite or huge
strengths are refused before anything runs; labels are added, accepted and rejected with the
history kept; a `<script>` label is escaped; a server bound beyond localhost refuses to start
without a token and then refuses writes and model runs without it; a loopback server refuses
other Host names and cross-site writes; a read-only server refuses writes and stores no run;
an over-large body is refused; a client that disconnects stops its generation and nothing is
stored."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest
from click.testing import CliRunner
from markupsafe import escape
from feature_helpers import register_tiny_sae
from sqlalchemy import func, select

from saereg.registry.catalog import db
from saereg.registry.catalog.feature_schema import (FeatureLabel, FeatureNeighbor, SteeringPreset,
                                                SteeringRun)
from saereg.registry.errors import UsageError

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from saereg.analysis.web.app import create_app  # noqa: E402

BASE = "http://127.0.0.1:8000"
HOSTILE = "<script>alert(1)</script> hostile <img src=x onerror=alert(2)>"


class Web:
    def __init__(self, ref, other, live, labelled):
        self.ref, self.other, self.live, self.labelled = ref, other, live, labelled
        self.app = create_app()
        self.client = TestClient(self.app, base_url=BASE)


@pytest.fixture
def web(tiny_sae, tiny_model_dir, tmp_path):
    from saereg.analysis import labels
    from saereg.analysis.stats import AnalyzeConfig, analyze, feature_stats

    other = register_tiny_sae(tiny_model_dir, tmp_path, seed=1)  # version 2, other weights
    analyze(tiny_sae, AnalyzeConfig(tokens=512, context_size=32), progress=False)
    made = labels.label_heuristic(tiny_sae)
    live = sorted(lab.feature_index for lab in made)
    densest = max(live, key=lambda i: feature_stats(tiny_sae, i)[2].firing_rate)
    labels.add_label(tiny_sae, live[1], HOSTILE)
    return Web(tiny_sae, other, live, densest)


def counts() -> dict[str, int]:
    with db.session() as s:
        return {t.__tablename__: s.scalar(select(func.count()).select_from(t))
                for t in (FeatureLabel, SteeringPreset, SteeringRun)}


def events(text: str) -> list[tuple[str, dict]]:
    """The Server-Sent Events of a response body as (event name, data)."""
    out = []
    for block in text.strip().split("\n\n"):
        name, data = "message", None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
        out.append((name, data))
    return out


def detail(response) -> str:
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str), body
    assert "\n" not in body["detail"] and "Traceback" not in body["detail"]
    return body["detail"]


def test_pages_and_their_json_twins(web):
    c, ref = web.client, web.ref
    r = c.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/saes"

    page = c.get("/saes").text
    listed = c.get("/api/saes").json()["versions"]
    assert [v["ref"] for v in listed] == [ref, web.other]
    for v in listed:
        assert f'<tr class="version" data-ref="{v["ref"]}">' in page
        assert f'<a class="version-link" href="/sae/{v["ref"]}">' in page
    for name in ("model", "hook", "arch", "tag"):
        assert f'name="{name}"' in page
    assert len(c.get("/api/saes", params={"arch": "topk"}).json()["versions"]) == 2
    assert c.get("/api/saes", params={"arch": "relu"}).json()["versions"] == []
    assert c.get("/api/saes", params={"tag": "sweep=a"}).json()["versions"] == []
    assert "data-ref" not in c.get("/saes", params={"hook": "model.layers.3"}).text

    v = c.get(f"/api/sae/{ref}").json()
    assert v["config"]["d_sae"] == 96 and v["lineage"]["hook"] == "model.layers.1"
    assert v["stats"]["first_live"] == web.live[0] and v["diff_choices"] == [web.other]
    page = c.get(f"/sae/{ref}").text
    for part in ('id="config"', 'id="metrics"', 'id="lineage"', 'id="alias-history"',
                 'id="publications"', 'form id="diff"', 'select name="other"',
                 f'id="open-prompt" class="button" href="/prompt?sae={ref.replace("@", "%40")}"',
                 f'id="open-steer" class="button" href="/steer?sae={ref.replace("@", "%40")}"',
                 f'id="features" class="button" href="/sae/{ref}/feature/{web.live[0]}"'):
        assert part in page, part
    r = c.get(f"/sae/{ref}/diff", params={"other": web.other}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/sae/{ref}/diff/{web.other}"
    d = c.get(f"/api/sae/{ref}/diff/{web.other}").json()
    assert d["same_weights"] is False and (d["left"], d["right"]) == (ref, web.other)
    assert 'id="diff"' in c.get(f"/sae/{ref}/diff/{web.other}").text

    i = web.labelled
    f = c.get(f"/api/sae/{ref}/feature/{i}").json()
    st = f["stats"]
    assert st["firing_rate"] > 0 and st["flag"] in (None, "dense")
    assert len(st["histogram"]["bins"]) == len(st["histogram"]["counts"]) == 40
    assert sum(b["count"] for b in st["histogram"]["bins"]) > 0
    assert f["label"]["text"].startswith("fires on") and f["label"]["method"] == "heuristic"
    groups = {g["ref"]: g for g in f["neighbors"]}
    assert set(groups) == {ref, web.other} and all(len(g["features"]) == 8 for g in groups.values())
    assert all(n["index"] != i for n in groups[ref]["features"])
    # computed from the server's loaded SAE without a write: a page view stays a read, and
    # gives what the library stores when asked
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(FeatureNeighbor)) == 0
    from saereg.analysis.neighbors import neighbors

    stored = neighbors(ref, i, k=8)
    assert [(n["index"], round(n["cosine"], 5)) for n in groups[ref]["features"]] == [
        (n.index, round(n.cosine, 5)) for n in stored]
    assert (f["prev"], f["next"]) == (i - 1 if i else None, i + 1 if i < 95 else None)
    r = c.get(f"/sae/{ref}/feature/{i}")
    assert re.fullmatch(r"app;dur=\d+\.\d", r.headers["server-timing"])
    page = r.text
    assert page.count('<rect class="bar"') == 40
    assert page.count('<div class="example">') >= len(st["top_examples"]) > 0
    top = page.split('id="top-examples"')[1].split('id="interval-examples"')[0]
    assert top.count('<div class="example">') == len(st["top_examples"])
    assert re.search(r'<span class="tok[^"]*" data-act="[0-9.e-]+" title="[^"]+" '
                     r'style="background-color: rgba', top)
    assert f'data-flag="{st["flag"] or "none"}"' in page
    assert f'<strong id="label-current">{escape(f["label"]["text"])}</strong>' in page
    assert 'id="add-label"' in page and 'id="jump"' in page and 'id="prev"' in page
    r = c.get(f"/sae/{ref}/feature", params={"index": 7}, follow_redirects=False)
    assert r.headers["location"] == f"/sae/{ref}/feature/7"

    hits = c.get("/api/search", params={"q": "fires", "sae": "tiny-sae"}).json()["hits"]
    assert {h["index"] for h in hits} <= set(web.live) and len(hits) > 5
    page = c.get("/search", params={"q": "fires", "sae": "tiny-sae", "min_rate": ""}).text
    assert page.count('<li class="hit">') == len(hits)
    assert f'<a href="/sae/{ref}/feature/{hits[0]["index"]}">' in page
    assert c.get("/search").status_code == 200

    spec = c.get("/openapi.json").json()
    assert {"/api/saes", "/api/sae/{ref}/feature/{index}", "/api/sae/{ref}/steer",
            "/api/labels/{label_id}/status", "/api/presets"} <= set(spec["paths"])
    docs = c.get("/docs").text
    assert "/api/sae/{ref}/prompt" in docs and "SteerIn" in docs

    prompt, steer = c.get(f"/prompt?sae={ref}").text, c.get(f"/steer?sae={ref}").text
    for part in ('id="prompt"', 'id="mode"', 'value="feature"', 'value="top"', 'id="feature"',
                 'id="tokens"', 'id="token-features"'):
        assert part in prompt, part
    for part in ('id="steer-features"', 'class="steer-feature"', 'class="index"',
                 'class="strength"', 'id="add-feature"', 'id="method"', 'id="preset"',
                 'id="steer-prompt"', 'id="max-new-tokens"', 'id="seed"', 'id="run"',
                 'id="default-output"', 'id="steered-output"', 'id="preset-name"',
                 'id="save-preset"', 'id="runs"'):
        assert part in steer, part
    assert f'href="/prompt?sae={web.other.replace("@", "%40")}"' in c.get("/prompt").text

    # everything ships with the package: no page or asset names another host
    pages = [c.get(p).text for p in ("/saes", f"/sae/{ref}", f"/sae/{ref}/feature/{i}",
                                     "/search?q=fires", f"/prompt?sae={ref}", f"/steer?sae={ref}",
                                     "/docs")]
    assets = sorted({a for p in pages for a in re.findall(r'(?:src|href)="(/static/[^"]+)"', p)})
    assert {a.split("?")[0] for a in assets} >= {"/static/app.css", "/static/app.js",
                                                 "/static/feature.js", "/static/prompt.js",
                                                 "/static/steer.js"}
    for a in assets:
        r = c.get(a)
        assert r.status_code == 200 and not re.search(r"https?://", r.text), a
    for p in pages:
        assert not re.search(r'(?:src|href)="(?:https?:)?//', p)
        assert "<nav>" in p and 'href="/search"' in p


def test_bad_references_and_indices_are_one_line_errors(web):
    c, ref = web.client, web.ref
    cases = [
        ("/api/sae/nope", 404, "unknown SAE 'nope'"),
        ("/api/sae/tiny-sae@9", 404, "unknown version tiny-sae@9"),
        ("/api/sae/tiny-sae@prod", 404, "unknown version tiny-sae@prod"),
        ("/api/sae/-bad", 422, "invalid SAE name"),
        ("/api/sae/~", 422, "not a catalog reference"),
        (f"/api/sae/{ref}/feature/96", 422, "out of range"),
        (f"/api/sae/{ref}/feature/-1", 422, "out of range"),
        (f"/api/sae/{ref}/feature/abc", 422, "index: "),
        (f"/api/sae/{ref}/diff/nope@1", 404, "unknown SAE 'nope'"),
        ("/api/sae/nope/steering-runs", 404, "unknown SAE"),
        ("/api/search?q=%20", 422, "at least one word"),
        ("/api/nothing-here", 404, "no page at /api/nothing-here"),
    ]
    for path, status, words in cases:
        r = c.get(path)
        assert r.status_code == status, (path, r.text)
        assert words in detail(r), (path, r.text)
    for path, status in (("/sae/nope", 404), (f"/sae/{ref}/feature/96", 422),
                         (f"/sae/{ref}/feature/x", 422), ("/prompt?sae=nope@2", 404),
                         (f"/sae/{ref}/diff/nope", 404), ("/search?q=x&min_rate=lots", 422)):
        r = c.get(path)
        assert r.status_code == status and r.headers["content-type"].startswith("text/html")
        assert 'id="detail"' in r.text and "Traceback" not in r.text, path
    # a release reference as a path: the page of the version pulled from it, else how to pull
    from saereg.registry.catalog.queries import SAE_ID_TAG, release_tag
    from saereg.registry.catalog.writes import Catalog

    Catalog().tag(ref, {release_tag("gemma-scope-2b-pt-res"): "layer_1/width_16k/canonical",
                        SAE_ID_TAG: "layer_1/width_16k/canonical"})
    r = c.get("/saelens/gemma-scope-2b-pt-res/layer_1/width_16k/canonical",
              follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/sae/{ref}", r.text
    r = c.get("/saelens/gemma-scope-2b-pt-res/layer_2/width_16k/canonical")
    assert r.status_code == 404 and "saereg sync pull --release gemma-scope-2b-pt-res " \
        "--sae-id layer_2/width_16k/canonical" in r.text.replace("\n", " ")
    r = c.post("/api/labels/99999/status", json={"status": "accepted"})
    assert r.status_code == 404 and "unknown label '99999'" in detail(r)
    r = c.post(f"/api/sae/{ref}/feature/96/labels", json={"text": "x"})
    assert r.status_code == 422 and "out of range" in detail(r)
    r = c.post("/api/sae/nope@1/prompt", json={"text": "hi"})
    assert r.status_code == 404 and "unknown SAE" in detail(r)


def test_prompt_streams_each_token_with_its_features(web):
    from saereg.analysis.prompt import explain_prompt

    c, ref, text = web.client, web.ref, "def parse(value):\n    return value"
    r = c.post(f"/api/sae/{ref}/prompt", json={"text": text, "feature": web.labelled, "top": 3})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    got = events(r.text)
    assert got[-1][0] == "done" and got[-1][1]["tokens"] == len(got) - 1
    tokens = [data for name, data in got[:-1]]
    want = explain_prompt(text, ref, top=3)
    assert [t["position"] for t in tokens] == list(range(len(want)))
    assert tokens[0]["special"] and not any(t["special"] for t in tokens[1:])
    for t, w in zip(tokens, want):
        assert [f[0] for f in t["features"]] == [i for i, _, _ in w.features]
        assert [f[2] for f in t["features"]] == [lab for _, _, lab in w.features]
        assert [f[1] for f in t["features"]] == pytest.approx([v for _, v, _ in w.features],
                                                              abs=1e-4)
        top = {i: v for i, v, _ in w.features}
        assert t["act"] == pytest.approx(top.get(web.labelled, t["act"]), abs=1e-4)
        assert t["act"] >= 0
    r = c.post(f"/api/sae/{ref}/prompt", json={"text": "hello there", "top": 0})
    assert all("features" not in d and "act" not in d for n, d in events(r.text)[:-1])
    assert web.app.state.models.loads == {"models": 1, "saes": 1}  # warm across requests

    bad = [({"text": "word " * 400}, "longer than the model's context (256)"),
           ({"text": "x" * 20_001}, "text: "),
           ({"text": "   "}, "the prompt is empty"),
           ({"text": "hi", "feature": 96}, "out of range"),
           ({"text": "hi", "top": 99}, "top: "),
           ({"text": "hi", "extra": 1}, "extra: ")]
    for body, words in bad:
        r = c.post(f"/api/sae/{ref}/prompt", json=body)
        assert r.status_code == 422 and words in detail(r), (body, r.text)


def test_steering_streams_both_sides_and_stores_the_run(web, tiny_lm):
    from saereg.analysis.steering import get_preset, steer

    c, ref, f = web.client, web.ref, web.labelled
    body = {"prompt": "The weather today is", "features": [{"index": f, "strength": 40.0}],
            "method": "add", "max_new_tokens": 6, "seed": 3, "temperature": 1.0}
    r = c.post(f"/api/sae/{ref}/steer", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    got = events(r.text)
    name, done = got[-1]
    assert name == "done" and done["run_id"] and done["preset"] == "scratch.tiny-sae.1@1"
    pieces = {side: "".join(d["text"] for n, d in got[:-1] if d["side"] == side)
              for side in ("default", "steered")}
    assert pieces == {"default": done["default"], "steered": done["steered"]}
    assert [d["side"] for n, d in got[:-1]] == sorted(d["side"] for n, d in got[:-1])
    runs = c.get(f"/api/sae/{ref}/steering-runs").json()
    assert [(x["id"], x["default"], x["steered"], x["seed"]) for x in runs] == [
        (done["run_id"], done["default"], done["steered"], 3)]
    again = steer(done["preset"], body["prompt"], seed=3, lm=tiny_lm, store=False)
    assert (again.default, again.steered) == (done["default"], done["steered"])
    assert again.default != again.steered
    assert get_preset("scratch.tiny-sae.1").features[0]["strength"] == 40.0
    r = c.post(f"/api/sae/{ref}/steer", json={**body, "seed": 4})  # same features: same preset
    assert events(r.text)[-1][1]["preset"] == "scratch.tiny-sae.1@1"
    r = c.post(f"/api/sae/{ref}/steer", json={**body, "method": "clamp"})
    assert events(r.text)[-1][1]["preset"] == "scratch.tiny-sae.1@2"
    assert len(c.get(f"/api/sae/{ref}/steering-runs").json()) == 3

    r = c.post("/api/presets", json={"name": "warm", "sae": ref, "method": "add",
                                      "features": [{"index": f, "strength": 12}],
                                      "max_new_tokens": 4, "seed": 1})
    assert r.status_code == 201 and r.json()["ref"] == "warm@1"
    r = c.post("/api/presets", json={"name": "warm", "sae": ref,
                                      "features": [{"index": f, "strength": 20}]})
    assert r.json()["ref"] == "warm@2" and r.json()["generation"]["max_new_tokens"] == 4
    r = c.post(f"/api/sae/{ref}/steer", json={"prompt": "Hello", "preset": "warm@1"})
    done = events(r.text)[-1][1]
    assert done["preset"] == "warm@1" and done["seed"] == 1 and done["run_id"]
    names = [p["ref"] for p in c.get(f"/api/sae/{ref}/presets").json()]
    assert {"warm@1", "warm@2", "scratch.tiny-sae.1@1", "scratch.tiny-sae.1@2"} == set(names)
    page = c.get(f"/sae/{ref}/feature/{f}").text
    assert page.count('<li><a href="/steer?sae=') == 4
    assert c.get(f"/steer?sae={ref}").text.count('<li class="run"') == 4

    before = counts()
    ok = {"prompt": "Hi", "features": [{"index": f, "strength": 1.0}]}
    raw = json.dumps(ok)
    for text, status, words in [
            (raw.replace("1.0", "NaN"), 422, "strength: "),
            (raw.replace("1.0", "Infinity"), 422, "strength: "),
            (raw.replace("1.0", "-1e9"), 422, "strength: "),
            (json.dumps({**ok, "max_new_tokens": 1000}), 422, "max_new_tokens: "),
            (json.dumps({**ok, "temperature": -1}), 422, "temperature: "),
            (json.dumps({**ok, "prompt": "word " * 250, "max_new_tokens": 20}), 422,
             "longer than the model's context (256)"),
            (json.dumps({**ok, "prompt": " "}), 422, "non-empty prompt"),
            (json.dumps({**ok, "preset": "warm"}), 422, "not both"),
            (json.dumps({"prompt": "Hi"}), 422, "at least one feature"),
            (json.dumps({**ok, "features": [{"index": 96, "strength": 1}]}), 422,
             "out of range"),
            (json.dumps({"prompt": "Hi", "preset": "nope"}), 404, "unknown preset 'nope'"),
            (json.dumps({"name": "x", "sae": ref, "features": []}), 422, "features: ")]:
        path = "/api/presets" if '"name"' in text else f"/api/sae/{ref}/steer"
        r = c.post(path, content=text, headers={"content-type": "application/json"})
        assert r.status_code == status and words in detail(r), (text, r.text)
    assert counts() == before


def test_labels_are_added_accepted_and_rejected(web, monkeypatch):
    monkeypatch.setenv("SAEREG_USER", "carol")
    c, ref, i = web.client, web.ref, web.live[2]
    first = c.post(f"/api/sae/{ref}/feature/{i}/labels", json={"text": "  nested   brackets "})
    assert first.status_code == 201
    assert (first.json()["text"], first.json()["method"], first.json()["author"]) == (
        "nested brackets", "human", "carol")
    second = c.post(f"/api/sae/{ref}/feature/{i}/labels", json={"text": "braces"}).json()
    f = c.get(f"/api/sae/{ref}/feature/{i}").json()
    assert [lab["text"] for lab in f["labels"]][-2:] == ["nested brackets", "braces"]
    assert f["label"]["text"] == "braces"
    r = c.post(f"/api/labels/{first.json()['id']}/status", json={"status": "accepted"})
    assert r.status_code == 200 and r.json()["status"] == "accepted"
    assert c.get(f"/api/sae/{ref}/feature/{i}").json()["label"]["text"] == "nested brackets"
    c.post(f"/api/labels/{first.json()['id']}/status", json={"status": "rejected"})
    f = c.get(f"/api/sae/{ref}/feature/{i}").json()
    assert f["label"]["id"] == second["id"]
    assert [lab["status"] for lab in f["labels"] if lab["method"] == "human"] == [
        "rejected", "candidate"]
    page = c.get(f"/sae/{ref}/feature/{i}").text
    assert page.count('<li class="label') == len(f["labels"])
    assert f'<button type="button" class="accept" data-label-id="{second["id"]}">' in page
    before = counts()
    for body, words in (({"text": "   "}, "needs some text"), ({"text": "x" * 2001}, "text: "),
                        ({"txt": "x"}, "text: ")):
        r = c.post(f"/api/sae/{ref}/feature/{i}/labels", json=body)
        assert r.status_code == 422 and words in detail(r)
    r = c.post(f"/api/labels/{second['id']}/status", json={"status": "great"})
    assert r.status_code == 422 and "status: " in detail(r)
    assert counts() == before


def test_a_script_label_is_shown_as_text(web):
    c, ref, i = web.client, web.ref, web.live[1]
    for path in (f"/sae/{ref}/feature/{i}", "/search?q=hostile"):
        r = c.get(path)
        assert "<script>alert" not in r.text and "<img" not in r.text, path
        assert str(escape(HOSTILE)) in r.text, path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("style-src")[0]
    assert c.get(f"/api/sae/{ref}/feature/{i}").json()["label"]["text"] == HOSTILE


def test_token_binding_read_only_and_request_limits(web):
    ref, i = web.ref, web.live[3]
    with pytest.raises(UsageError, match="give it a --token"):
        create_app(host="0.0.0.0")
    r = CliRunner().invoke(__import__("saereg.commands.main", fromlist=["cli"]).cli,
                           ["serve", "--host", "0.0.0.0", "--port", "0"])
    assert r.exit_code == 2 and "--token" in r.output
    assert create_app(host="localhost").state.policy.loopback

    token = "t0ken-for-tests"
    c = TestClient(create_app(host="0.0.0.0", token=token), base_url="http://192.0.2.7:8000")
    label = {"text": "a label"}
    before = counts()
    assert c.get(f"/sae/{ref}/feature/{i}").status_code == 200  # reading needs nothing
    for path, body in ((f"/api/sae/{ref}/feature/{i}/labels", label),
                       (f"/api/sae/{ref}/prompt", {"text": "hi"}),
                       (f"/api/sae/{ref}/steer", {"prompt": "hi", "features": [
                           {"index": i, "strength": 2}]}),
                       ("/api/presets", {"name": "p", "sae": ref,
                                         "features": [{"index": i, "strength": 2}]}),
                       ("/api/labels/1/status", {"status": "accepted"})):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            r = c.post(path, json=body, headers=headers)
            assert r.status_code == 401 and "needs its token" in detail(r), (path, headers)
    assert counts() == before
    auth = {"Authorization": f"Bearer {token}"}
    assert c.post(f"/api/sae/{ref}/feature/{i}/labels", json=label, headers=auth).status_code == 201
    assert c.post(f"/api/sae/{ref}/prompt", json={"text": "hi"}, headers=auth).status_code == 200

    c = web.client  # loopback, no token: writes are open to this machine's own pages only
    r = c.get("/saes", headers={"Host": "attacker.example"})
    assert r.status_code == 421 and "127.0.0.1 or localhost" in detail(r)
    before = counts()
    r = c.post(f"/api/sae/{ref}/feature/{i}/labels", json=label,
               headers={"Origin": "http://attacker.example"})
    assert r.status_code == 403 and "another site" in detail(r)
    r = c.post(f"/api/sae/{ref}/feature/{i}/labels", content=json.dumps(label),
               headers={"content-type": "text/plain"})  # a form another page could send
    assert r.status_code == 422
    r = c.post(f"/api/sae/{ref}/feature/{i}/labels", json={"text": "x" * 70_000})
    assert r.status_code == 413 and "larger than 64 KiB" in detail(r)
    assert counts() == before
    r = c.post(f"/api/sae/{ref}/feature/{i}/labels", json=label, headers={"Origin": BASE})
    assert r.status_code == 201

    ro = TestClient(create_app(read_only=True), base_url=BASE)
    before = counts()
    for path, body in ((f"/api/sae/{ref}/feature/{i}/labels", label),
                       ("/api/labels/1/status", {"status": "rejected"}),
                       ("/api/presets", {"name": "p", "sae": ref,
                                         "features": [{"index": i, "strength": 2}]})):
        r = ro.post(path, json=body)
        assert r.status_code == 403 and "read-only" in detail(r)
    r = ro.post(f"/api/sae/{ref}/steer", json={"prompt": "Hello", "max_new_tokens": 3,
                                               "features": [{"index": i, "strength": 30}]})
    name, done = events(r.text)[-1]
    assert r.status_code == 200 and name == "done" and done["run_id"] is None
    assert done["default"] and done["steered"]
    assert counts() == before
    page = ro.get(f"/sae/{ref}/feature/{i}").text
    assert 'read-only' in page and '<button type="submit" disabled>' in page


def _serve(app):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, sock.getsockname()[1]


def test_a_client_that_disconnects_stops_its_generation(web, tiny_model_dir):
    import httpx

    app = web.app
    server, thread, port = _serve(app)
    try:
        lm = app.state.models._model(str(tiny_model_dir)).lm
        forwards = []
        hook = lm.model.register_forward_hook(lambda *a: forwards.append(1))
        body = {"prompt": "Hello", "max_new_tokens": 240, "temperature": 1.0,
                "features": [{"index": web.labelled, "strength": 5}]}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            with client.stream("POST", f"/api/sae/{web.ref}/steer", json=body) as r:
                assert r.status_code == 200
                first = next(r.iter_lines())
                assert json.loads(first[len("data: "):])["side"] == "default"
        entry = app.state.models._models[str(tiny_model_dir)]
        deadline = time.monotonic() + 60
        while (entry.lock.locked() or any(t.name == "saereg-steer" and t.is_alive()
                                          for t in threading.enumerate())):
            assert time.monotonic() < deadline, "the generation went on after the disconnect"
            time.sleep(0.05)
        hook.remove()
        assert 0 < len(forwards) < 2 * 240  # the default side never finished, the steered never ran
        assert counts()["steering_runs"] == 0
    finally:
        server.should_exit = True
        thread.join(10)
