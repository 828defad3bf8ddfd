"""Faults of training and of loading the model an SAE was trained on (issue "Reliability"),
one test per case:

- the packaged model named by its hub id loads from its converted copy with no request to the
  hub: HF_ENDPOINT points at a server on 127.0.0.1 that counts requests, and the hub is not
  in offline mode (a model that is not on this machine does reach that server);
- a hub model already in huggingface_hub's cache loads from there with no request;
- `saereg analyze` and `saereg steer` of an SAE whose cfg.json names the packaged model's hub
  id make no request either (SQLite and PostgreSQL);
- an SAE whose cfg.json names the packaged alias steers, and one preset may hold features of
  SAEs recorded under the alias and under the hub id: both names are one model;
- Ctrl-C during `saereg train` (a real process, SIGINT after its first checkpoint) exits 130
  with one line naming the job and `saereg train --resume JOB`, marks job.json "interrupted"
  (no error) and the job's MLflow runs KILLED, keeps the checkpoint, and the resume finishes
  the job in the same runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from saereg.commands.main import cli
from saereg.registry.errors import ModelNotFoundError
from saereg.registry.paths import saereg_home

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "registry"))
from catalog_helpers import BACKENDS, migrated_pg_database, table_counts, use_backend  # noqa: E402

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMALL = ["--k", "8", "--expansion", "4", "--context-size", "64", "--batch-tokens", "512",
         "--buffer-tokens", "2048", "--lm-batch-size", "8", "--eval-tokens", "1024",
         "--log-every", "2", "--no-progress"]


class _Counting(BaseHTTPRequestHandler):
    """Records every request and answers 404: a hub that has nothing."""

    seen: list[tuple[str, str]]

    def _any(self) -> None:
        self.seen.append((self.command, self.path))
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_POST = do_PUT = _any

    def log_message(self, *args) -> None:
        pass


def _point_hub_at(monkeypatch, url: str, hf_home: Path) -> None:
    """huggingface_hub (and transformers through it) online, at ``url``, with its own cache."""
    import huggingface_hub.constants as c

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    env = {"HF_ENDPOINT": url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(hf_home),
           "HF_HUB_CACHE": str(hf_home / "hub")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key, value in {"HF_HUB_OFFLINE": False, "ENDPOINT": url, "HF_HUB_DISABLE_XET": True,
                       "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
                       "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"),
                       "HF_TOKEN_PATH": str(hf_home / "token"),
                       "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens")}.items():
        monkeypatch.setattr(c, key, value)


@pytest.fixture
def hub_requests(monkeypatch, tmp_path):
    """The requests that reach the (online, empty) hub during the test."""
    seen: list[tuple[str, str]] = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Counting,), {"seen": seen}))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _point_hub_at(monkeypatch, f"http://127.0.0.1:{httpd.server_address[1]}", tmp_path / "hf")
    yield seen
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def converted_copy(tiny_model_dir):
    """The tiny LLaMA standing in for the packaged model's converted copy, where load_lm keeps
    it, recording the hub id it stands for as a conversion does."""
    folder = saereg_home() / "models" / "smollm2-135m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "saereg-source.json").write_text(json.dumps({"name": HUB_ID, "gguf": "tiny"}))
    return folder


@pytest.fixture(scope="session")
def faults_pg_url():
    yield from migrated_pg_database("saereg_trainfaults")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch, mlflow_store):
    yield from use_backend(request, monkeypatch, "faults_pg_url")


def _register(model_name: str, tmp_path: Path, name: str) -> str:
    """A random TopK SAE on the tiny LLaMA's layer 1 whose cfg.json names ``model_name``."""
    from saereg.registry.api import register_from_folder
    from saereg.registry.sae.folder import save_sae
    from saereg.registry.sae.modules import SAEConfig, build_sae

    cfg = SAEConfig(d_in=64, d_sae=96, architecture="topk", k=8,
                    metadata={"model_name": model_name, "hook_name": "model.layers.1"})
    folder = save_sae(build_sae(cfg, seed=0), tmp_path / name, overwrite=True)
    return register_from_folder(folder, name).ref


def _first_checkpoint(proc, timeout: float = 240) -> Path | None:
    """The job's ``checkpoints/last.ckpt`` as soon as ``proc`` has written it (checkpoints
    are moved into place complete); None when the process ends or ``timeout`` passes first."""
    from saereg.registry.paths import runs_dir

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(runs_dir().glob("*/checkpoints/last.ckpt"))
        if found:
            return found[0]
        time.sleep(0.05)
    return None


def test_packaged_model_named_by_its_hub_id_loads_without_the_network(converted_copy,
                                                                       hub_requests):
    from saereg.analysis.lm import load_model
    from saereg.training.lm import load_lm

    for name in (HUB_ID, HUB_ID.lower(), "smollm2-135m"):
        lm = load_model(name)
        assert (lm.name, lm.source, lm.d_model) == (HUB_ID, "packaged", 64)
    assert load_lm(HUB_ID).name == HUB_ID
    assert hub_requests == []
    with pytest.raises(ModelNotFoundError, match="acme/not-here"):
        load_lm("acme/not-here")  # not on this machine: it is the hub that is asked
    assert hub_requests


def test_hub_model_in_the_local_cache_loads_without_the_network(tiny_model_dir, hub_requests,
                                                                monkeypatch):
    from huggingface_hub import snapshot_download

    from hubserver import HubServer
    from saereg.training.lm import load_lm

    import huggingface_hub.constants as c

    hub = HubServer().start()  # the real client fills its cache from a hub that has the model
    try:
        hub.state.put_files("acme/tiny-llama", {p.name: p.read_bytes()
                                                for p in tiny_model_dir.iterdir() if p.is_file()})
        here = c.ENDPOINT
        monkeypatch.setattr(c, "ENDPOINT", hub.url)
        monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        snapshot_download("acme/tiny-llama")
        monkeypatch.setattr(c, "ENDPOINT", here)
        monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE",
                            here + "/{repo_id}/resolve/{revision}/{filename}")
    finally:
        hub.stop()
    hub_requests.clear()
    lm = load_lm("acme/tiny-llama")
    assert (lm.name, lm.source, lm.n_layers) == ("acme/tiny-llama", "hub", 4)
    assert hub_requests == []


def test_analyze_and_steer_of_an_sae_on_the_hub_id_make_no_request(backend, converted_copy,
                                                                   hub_requests, tmp_path):
    ref = _register(HUB_ID, tmp_path, "on-hub-id")
    r = CliRunner().invoke(cli, ["analyze", ref, "--tokens", "512", "--context-size", "32"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["preset", "create", "p", "--sae", ref, "--feature", "3",
                                 "--strength", "4", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["steer", "--preset", "p", "Hello"])
    assert r.exit_code == 0, r.output
    assert "stored as steering run" in r.output
    assert hub_requests == []


def test_sae_recorded_under_the_packaged_alias_steers(backend, converted_copy, tmp_path):
    alias_ref = _register("smollm2-135m", tmp_path, "on-alias")
    hub_ref = _register(HUB_ID, tmp_path, "on-hub-id")
    r = CliRunner().invoke(cli, ["preset", "create", "mixed", "--sae", alias_ref,
                                 "--feature", "3", "--feature", f"{hub_ref}:5", "--strength", "4",
                                 "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
    before = table_counts()
    r = CliRunner().invoke(cli, ["steer", "--preset", "mixed", "Hello"])
    assert r.exit_code == 0, r.output
    assert "steered (mixed@1" in r.output and "Traceback" not in r.output
    after = table_counts()
    assert after["steering_runs"] == before["steering_runs"] + 1


def test_ctrl_c_during_training_marks_the_job_interrupted_and_it_resumes(tiny_model_dir,
                                                                       mlflow_store):
    cmd = [sys.executable, "-m", "saereg.commands.main", "train", str(tiny_model_dir),
           "--hook", "model.layers.1", "--tokens", "51200", "--checkpoint-every", "5", *SMALL]
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ckpt = _first_checkpoint(proc)
        assert ckpt is not None, proc.communicate()[1][-3000:]
        # held still while the signal is sent, so that it lands mid-training however fast
        # the remaining steps would run
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    job_dir = ckpt.parent.parent
    job_id = job_dir.name
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Aborted" not in err, err[-3000:]
    (line,) = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert f"training job {job_id} interrupted at step" in line
    assert line.endswith(f"resume with: saereg train --resume {job_id}")

    job = json.loads((job_dir / "job.json").read_text())
    assert job["status"] == "interrupted" and "error" not in job
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert 0 < saved["global_step"] <= job["stopped_at_step"] < 100
    (run_id,) = job["runs"].values()
    for rid in (run_id, job["parent_run"]):
        assert mlflow_store.get_run(rid).info.status == "KILLED"

    result = CliRunner().invoke(cli, ["train", "--resume", job_id, "--no-progress"])
    assert result.exit_code == 0, result.output
    job = json.loads((job_dir / "job.json").read_text())
    assert job["status"] == "finished" and list(job["runs"].values()) == [run_id]
    for rid in (run_id, job["parent_run"]):
        assert mlflow_store.get_run(rid).info.status == "FINISHED"
    history = mlflow_store.get_metric_history(run_id, "tokens_seen")
    assert max(m.step for m in history) == 100  # 51200 // 512 steps in all
