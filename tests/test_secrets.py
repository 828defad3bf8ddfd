"""No credential leaves the process: one distinctive value is planted as the HF token (push and
pull against the hub-compatible server of tests/hubserver.py), as the password inside
MLFLOW_TRACKING_URI (``http://user:TOKEN@127.0.0.1:PORT``, a real ``mlflow server`` with a
SQLite store) and as the LLM explainer's API key (a local OpenAI-compatible server). `saereg
train --register`, `analyze`, `label --llm`, `sync push` and `sync pull` run through the CLI,
and so does one failing call per credential (the hub answers 500, a tracking server refuses
with 403, the LLM endpoint answers 500). Each credential is shown to reach its server, and the
value (plain, URL-encoded, or inside HTTP basic auth) appears in no captured stdout/stderr, log
record, warning, exception, file under SAEREG_HOME (job.json, configs, cfg.json, runs), file
the MLflow server or the hub stored, nor in any MLflow experiment, run name, param, tag,
metric or registered model; the messages that name the tracking store show it masked. And
``redact`` masks each form of secret exactly, leaving ordinary text (``KEY=VALUE``, ``tokens=``,
``hf_hub_download``) alone."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote

import pytest
from click.testing import CliRunner
from hubserver import serve_hub_online

from saereg.commands.main import cli

TOKEN = "Pl4nted-s3cret-7Qz9Xw2kD"  # not hf_-shaped: only its use as a known secret masks it
USER = "trainer"
REPO = "acme/secret-saes"
FORBIDDEN = (TOKEN, quote(TOKEN, safe=""),
             base64.b64encode(f"{USER}:{TOKEN}".encode()).decode(),
             base64.b64encode(f"{USER}:{TOKEN}".encode()).decode().rstrip("="))
TRAIN = ["--hook", "model.layers.1", "--tokens", "1024", "--k", "4", "--expansion", "2",
         "--context-size", "32", "--batch-tokens", "256", "--buffer-tokens", "512",
         "--lm-batch-size", "4", "--eval-tokens", "256", "--dead-tokens", "512",
         "--log-every", "1", "--no-progress"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(handler) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class Quiet(BaseHTTPRequestHandler):
    seen: ClassVar[list[str]] = []

    def log_message(self, *args) -> None:
        pass

    def _reply(self, status: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Refusing(Quiet):
    """A tracking server that refuses every request (as one with wrong credentials does)."""

    seen: ClassVar[list[str]] = []

    def _handle(self) -> None:
        Refusing.seen.append(self.headers.get("Authorization") or "")
        self._reply(403, {"error_code": "PERMISSION_DENIED", "message": "Permission denied"})

    do_GET = do_POST = _handle


class LLM(Quiet):
    """OpenAI-compatible chat completions: a label for a labelling prompt, "1" per text for a
    detection prompt; HTTP 500 when ``broken``."""

    seen: ClassVar[list[str]] = []
    broken = False

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        LLM.seen.append(self.headers.get("Authorization") or "")
        if LLM.broken:
            self._reply(500, {"error": "model crashed"})
            return
        prompt = body["messages"][-1]["content"]
        if prompt.startswith("Feature label:"):
            n = 0
            while f"\n{n + 1}. " in prompt:
                n += 1
            answer = "\n".join("1" for _ in range(n))
        else:
            answer = "plain text feature"
        self._reply(200, {"choices": [{"message": {"role": "assistant", "content": answer}}]})


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The test hub server, huggingface_hub online and pointed at it, TOKEN in HF_TOKEN."""
    yield from serve_hub_online(monkeypatch, tmp_path / "hf-home", TOKEN)


class MlflowServer:
    """A real `mlflow server` process on 127.0.0.1: a SQLite store copied from the session
    template, artifacts served from a folder, its output in a log file."""

    def __init__(self, template: Path, root: Path):
        (root / "artifacts").mkdir(parents=True)
        shutil.copy(template, root / "mlflow.db")
        port = free_port()
        self.root, self.log = root, root / "server.log"
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MLFLOW_", "HF_", "SAEREG_"))}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                 "--port", str(port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                 "--artifacts-destination", (root / "artifacts").as_uri()],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)

    def wait(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "no mlflow server\n" + self.log.read_text()
            time.sleep(0.3)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def mlflow_server(mlflow_template, tmp_path):
    """An `mlflow server` starting up (call ``wait()`` before using it), stopped afterwards."""
    server = MlflowServer(mlflow_template, tmp_path / "mlflow-server")
    yield server
    server.stop()


def files_under(*roots: Path):
    for root in roots:
        for f in Path(root).rglob("*"):
            if f.is_file() and not f.is_symlink():
                yield f


def mlflow_texts(url: str) -> list[str]:
    """Every experiment, run name, param, tag and metric (name and value) and every registered
    model, version, alias and tag of the tracking server, as text."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=url)
    out = []
    runs = 0
    for exp in client.search_experiments(view_type=ViewType.ALL):
        out += [exp.name, str(exp.artifact_location), json.dumps(exp.tags)]
        for run in client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL):
            runs += 1
            out += [str(run.info.run_name), str(run.info.artifact_uri)]
            for mapping in (run.data.params, run.data.tags, run.data.metrics):
                out += [f"{k}={v}" for k, v in mapping.items()]
            out += [a.path for a in client.list_artifacts(run.info.run_id)]
    models = client.search_registered_models()
    for m in models:
        out += [m.name, str(m.description), json.dumps(m.tags), json.dumps(m.aliases)]
        for v in client.search_model_versions(f"name='{m.name}'"):
            out += [str(v.source), str(v.run_id), json.dumps(v.tags), str(v.description)]
    assert runs >= 2 and models, "the tracking server holds nothing to check"
    return out


def test_no_credential_leaves_the_process(mlflow_server, hub, mlflow_template, tiny_model_dir,
                                          saereg_home_dir, tmp_path, monkeypatch, capfd, caplog,
                                          recwarn):
    caplog.set_level(logging.DEBUG)
    url, server_root, server_log = mlflow_server.url, mlflow_server.root, mlflow_server.log
    port = url.rsplit(":", 1)[1]
    llm, llm_url = serve(LLM)
    refusing, refusing_url = serve(Refusing)
    LLM.seen, LLM.broken, Refusing.seen = [], False, []
    for var in ("SAEREG_DATABASE_URL", "MLFLOW_REGISTRY_URI", "SAEREG_ARTIFACT_STORE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{USER}:{TOKEN}@127.0.0.1:{port}")
    monkeypatch.setenv("SAEREG_LLM_URL", f"{llm_url}/v1")
    monkeypatch.setenv("SAEREG_LLM_MODEL", "judge")
    monkeypatch.setenv("SAEREG_LLM_API_KEY", TOKEN)
    captured: list[str] = []
    mlflow_server.wait()  # it started up while the other fixtures were made

    def sh(*args: str, code: int = 0):
        result = CliRunner().invoke(cli, list(args))
        captured.append(result.output)
        if result.exc_info is not None:
            captured.append("".join(traceback.format_exception(*result.exc_info)))
        assert result.exit_code == code, result.output
        return result

    try:
        # tracking: a real server, the password inside the URI
        out = sh("train", str(tiny_model_dir), *TRAIN, "--register", "secret-sae").output
        assert f"Browse the runs:  http://{USER}:***@127.0.0.1:{port}" in out
        assert "registered secret-sae@1" in out

        # the LLM key: one labelled feature, then an endpoint that fails
        from saereg.analysis.explainer import LLMConfig
        from saereg.analysis.stats import feature_stats

        sh("analyze", "secret-sae", "--tokens", "1024", "--context-size", "32")
        live = next(i for i in range(128) if feature_stats("secret-sae", i)[2].flag is None)
        assert sh("label", "secret-sae", str(live), "--llm").output.startswith(f"{live}\t")
        assert LLM.seen and set(LLM.seen) == {f"Bearer {TOKEN}"}
        captured += [repr(LLMConfig.from_env()), str(LLMConfig.from_env())]
        LLM.broken = True
        assert "HTTP 500" in sh("label", "secret-sae", str(live), "--llm", code=1).output

        # the HF token: push and pull, then a hub that fails
        sh("sync", "push", "secret-sae@1", "--repo", REPO)
        # a pulled version has no MLflow run, and an MLflow server refuses a model version whose
        # source is a local path without one: the pull mirrors to this home's SQLite store
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        shutil.copy(mlflow_template, saereg_home_dir / "mlflow.db")
        sh("sync", "pull", REPO, "--name", "secret-pulled")
        assert f"Bearer {TOKEN}" in hub.state.auth_headers
        hub.state.fail_next("info")
        assert "500" in sh("sync", "pull", REPO, code=1).output

        # tracking refused: the client sends the URL's credentials, the error masks them
        monkeypatch.setenv("MLFLOW_TRACKING_URI",
                           refusing_url.replace("http://", f"http://{USER}:{TOKEN}@"))
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        out = sh("train", str(tiny_model_dir), *TRAIN, code=1).output
        masked = refusing_url.replace("http://", f"http://{USER}:***@")
        assert f"MLflow tracking at {masked}" in out and "PERMISSION_DENIED" in out
        assert Refusing.seen and set(Refusing.seen) == {
            "Basic " + base64.b64encode(f"{USER}:{TOKEN}".encode()).decode()}
    finally:
        for server in (llm, refusing):
            server.shutdown()
            server.server_close()

    jobs = [json.loads(f.read_text()) for f in (saereg_home_dir / "runs").glob("*/job.json")]
    assert sorted(j["status"] for j in jobs) == ["failed", "finished"]
    assert "MLflow tracking at http://trainer:***@" in next(j for j in jobs
                                                           if j["status"] == "failed")["error"]
    assert list(saereg_home_dir.glob("runs/*/saes/*/cfg.json"))

    std = capfd.readouterr()
    texts = {"CLI output and exceptions": "\n".join(captured), "stdout": std.out,
             "stderr": std.err, "log records": caplog.text,
             "warnings": "\n".join(str(w.message) for w in recwarn),
             "MLflow runs and models": "\n".join(mlflow_texts(url))}
    for where, text in texts.items():
        for secret in FORBIDDEN:
            assert secret not in text, f"{secret!r} in {where}"
    hub_blobs = [b.data for repo in hub.state.repos.values() for c in repo.commits.values()
                 for b in c.values()] + list(hub.state.lfs_objects.values())
    assert hub_blobs
    stored = [(str(f), f.read_bytes()) for f in files_under(saereg_home_dir, tmp_path)]
    stored += [(f"hub blob {i}", data) for i, data in enumerate(hub_blobs)]
    assert any(name.endswith("job.json") for name, _ in stored)
    assert any(str(server_root) in name and "artifacts" in name for name, _ in stored)
    assert any(name == str(server_log) for name, _ in stored)
    for name, data in stored:
        for secret in FORBIDDEN:
            assert secret.encode() not in data, f"{secret!r} in {name}"


@pytest.mark.parametrize(("text", "expected"), [
    ("http://u:p%40ss@127.0.0.1:5000/api?x=1", "http://u:***@127.0.0.1:5000/api?x=1"),
    ("https://ghp_abcdef@example.org/r.git", "https://***@example.org/r.git"),
    ("GET https://h/x?token=abc&ok=1&api_key=z&key=q failed",
     "GET https://h/x?token=***&ok=1&api_key=***&key=*** failed"),
    ("s3://b/o?X-Amz-Signature=abcd&X-Amz-Credential=ee",
     "s3://b/o?X-Amz-Signature=***&X-Amz-Credential=***"),
    ("password=hunter22 access_token=t0k", "password=*** access_token=***"),
    ("Authorization: Bearer sk-abcdefgh; retry", "Authorization: ***; retry"),
    ("sent Bearer sk-abcdefgh", "sent Bearer ***"),
    ("token hf_AbCdEfGhIjKlMnOpQrStUv rejected", "token hf_*** rejected"),
    (f"echo {TOKEN} and {quote(TOKEN + '/x', safe='')}", "echo *** and ***"),
    ("KEY=VALUE, --tokens=4096, hf_hub_download, the bearer token expired",
     "KEY=VALUE, --tokens=4096, hf_hub_download, the bearer token expired"),
])
def test_redact_masks_every_form(text, expected, monkeypatch):
    from saereg.registry.errors import redact

    monkeypatch.setenv("SAEREG_LLM_API_KEY", TOKEN + "/x")
    assert redact(text, TOKEN) == expected
