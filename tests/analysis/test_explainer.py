"""The LLM explainer against a real OpenAI-compatible HTTP server on 127.0.0.1 (a fixture that
answers chat completions deterministically): labels are stored with method llm, the model
name and a detection score in [0, 1] computed from the server's answers (a server that
answers "1" for every text scores exactly 0.5, chance); relabelling supersedes; the API key is sent but never stored; a broken endpoint is one clear error and stores
nothing; without SAEREG_LLM_URL the CLI exits 2."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from saereg.analysis.explainer import LLMConfig, detection_score, label_llm
from saereg.analysis.stats import AnalyzeConfig, analyze, feature_stats
from saereg.commands.main import cli
from saereg.registry.catalog import db
from saereg.registry.catalog.feature_schema import FeatureLabel
from saereg.registry.errors import SaeRegError


class Handler(BaseHTTPRequestHandler):
    mode = "smart"
    seen: ClassVar[list] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.seen.append((self.path, self.headers.get("Authorization"), body["model"]))
        prompt = body["messages"][-1]["content"]
        if Handler.mode == "broken":
            self.send_response(500)
            self.end_headers()
            return
        if prompt.startswith("Feature label:"):
            label = prompt.splitlines()[0].split("marks ", 1)[1]
            texts = [line.split(". ", 1)[1] for line in prompt.splitlines()[2:]]
            answer = "\n".join("1" if Handler.mode == "all" or label in t else "0"
                               for t in texts)
        else:
            peak = prompt.split("<<", 1)[1].split(">>", 1)[0]
            answer = f"marks {peak}\x07"  # a bell the stored label leaves out
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(out.encode())


@pytest.fixture
def llm_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Handler.mode, Handler.seen = "smart", []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_llm_labels_with_detection_score(tiny_sae, llm_server, monkeypatch):
    analyze(tiny_sae, AnalyzeConfig(tokens=1024, context_size=32), progress=False)
    live = [i for i in range(96) if feature_stats(tiny_sae, i)[2].flag is None][:3]
    cfg = LLMConfig(llm_server, "tiny-judge", api_key="sk-secret")
    made = label_llm(tiny_sae, live, cfg=cfg)
    assert [m.feature_index for m in made] == live
    assert all(m.method == "llm" and m.model == "tiny-judge" for m in made)
    assert all(m.text.startswith("marks ") for m in made)
    assert all(0.0 <= m.detection_score <= 1.0 for m in made)
    assert Handler.seen[0] == ("/v1/chat/completions", "Bearer sk-secret", "tiny-judge")
    Handler.mode = "all"
    (always,) = label_llm(tiny_sae, live[:1], cfg=cfg)
    assert always.detection_score == 0.5 and always.supersedes == made[0].id
    with db.session() as s:
        stored = s.scalars(select(FeatureLabel)).all()
    assert all("sk-secret" not in (r.text + (r.model or "")) for r in stored)

    Handler.mode = "broken"
    with pytest.raises(SaeRegError, match="HTTP 500") as err:
        label_llm(tiny_sae, live, cfg=cfg)
    assert "sk-secret" not in str(err.value)
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(FeatureLabel)) == len(stored)
    monkeypatch.delenv("SAEREG_LLM_URL", raising=False)
    r = CliRunner().invoke(cli, ["label", tiny_sae, str(live[0]), "--llm"])
    assert r.exit_code == 2 and "SAEREG_LLM_URL" in r.output
    monkeypatch.setenv("SAEREG_LLM_URL", llm_server)
    monkeypatch.setenv("SAEREG_LLM_MODEL", "tiny-judge")
    Handler.mode = "smart"
    r = CliRunner().invoke(cli, ["label", tiny_sae, str(live[0]), "--llm"])
    assert r.exit_code == 0 and r.output.startswith(f"{live[0]}\t")


def test_detection_score_without_negatives_is_none_not_nan():
    """A label with nothing to tell its examples from gets no score (stored as NULL, shown as
    '-'), not NaN, which JSON and the catalog's pull check refuse; the LLM is not asked (the
    endpoint here is a closed port)."""
    example = {"tokens": ["a", "b"], "peak": 1, "acts": [0.0, 1.0], "activation": 1.0}
    cfg = LLMConfig("http://127.0.0.1:9/v1", "tiny-judge")
    assert detection_score(cfg, "marks b", [example], []) is None
    assert detection_score(cfg, "marks b", [], [example]) is None
