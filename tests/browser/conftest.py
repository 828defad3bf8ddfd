"""Fixtures for browser tests: a real catalog in its own ``SAEREG_HOME`` (the tiny LLaMA, one
registered TopK SAE with a stats run and labels, one label being ``<script>alert(1)</script>``),
the real ``saereg serve`` running on a free port of 127.0.0.1 as a subprocess, and Debian's
Chromium driven through Playwright (one server and one browser per module).

The skip for a machine without ``/usr/bin/chromium`` or the ``playwright`` package lives in
the test modules (so that this file imports nothing from Playwright at collection time)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "analysis"))
from feature_helpers import register_tiny_sae

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
HOSTILE_LABEL = "<script>alert(1)</script>"
SEARCH_LABEL = "closing parentheses in code"
SERVER_START_S = 120.0


@dataclass
class WebCatalog:
    """What the browser tests know about the catalog the server shows."""

    home: Path
    ref: str
    """``NAME@V`` of the SAE version."""
    d_sae: int
    feature: int
    """The feature that fires most often (it has top examples and a labelled history)."""
    bins: int
    """Histogram bins of ``feature`` in the stats run."""
    top_examples: int
    """Top examples stored for ``feature``."""
    prompt: str
    """A prompt on which ``feature`` fires (the left context of its top example)."""
    prompt_tokens: int
    """Tokens of ``prompt`` (no special tokens)."""
    hostile: int
    """The feature whose current label is :data:`HOSTILE_LABEL`."""
    fresh: int
    """A live feature with no label (the label-adding test writes to it)."""
    search_label: str = SEARCH_LABEL
    """The current label of ``feature``."""
    hostile_label: str = HOSTILE_LABEL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_catalog(home: Path, work: Path, model_dir: Path) -> WebCatalog:
    from transformers import AutoTokenizer

    from saereg.analysis import labels
    from saereg.analysis.stats import AnalyzeConfig, analyze
    from saereg.registry.catalog import db
    from saereg.registry.catalog.feature_schema import FeatureStats

    ref = register_tiny_sae(model_dir, work, name="web-sae")
    run_id = analyze(ref, AnalyzeConfig(tokens=1024, context_size=32), progress=False)
    with db.session() as s:
        rows = s.query(FeatureStats).filter_by(stats_run_id=run_id).all()
        live = sorted((r for r in rows if r.top_examples), key=lambda r: -r.firing_rate)
        best, hostile, fresh = live[0], live[1], live[2]
        d_sae = len(rows)
        bins = len(best.histogram["counts"])
        examples = best.top_examples
        n_top = len(examples)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    contexts = [tok.decode(e["token_ids"][:e["peak"] + 1], skip_special_tokens=True)
                for e in examples[:5]]
    prompt = max(contexts, key=lambda t: sum(ch.isalpha() for ch in t)).strip()  # some words
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    labels.add_label(ref, best.feature_index, "an older label of the densest feature")
    labels.add_label(ref, best.feature_index, SEARCH_LABEL)
    labels.add_label(ref, hostile.feature_index, HOSTILE_LABEL)
    db.dispose_all()
    return WebCatalog(home=home, ref=ref, d_sae=d_sae, feature=best.feature_index, bins=bins,
                      top_examples=n_top, prompt=prompt, prompt_tokens=n_prompt,
                      hostile=hostile.feature_index,
                      fresh=fresh.feature_index,
                      )


@pytest.fixture(scope="module")
def web_catalog(tmp_path_factory, tiny_model_dir, mlflow_template):
    """A fresh ``SAEREG_HOME`` holding the catalog the server of this module shows."""
    home = tmp_path_factory.mktemp("web-home")
    work = tmp_path_factory.mktemp("web-work")
    shutil.copy(mlflow_template, home / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAEREG_HOME", str(home))
        for var in ("SAEREG_DATABASE_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                    "SAEREG_ARTIFACT_STORE"):
            mp.delenv(var, raising=False)
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            mp.setenv(var, "1")
        return _build_catalog(home, work, tiny_model_dir)


def _server_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SAEREG_DATABASE_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                        "SAEREG_ARTIFACT_STORE", "SAEREG_TOKEN")}
    env.update(SAEREG_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def server(web_catalog, tmp_path_factory):
    """``saereg serve --port P`` on 127.0.0.1 (no token: local writes are open); yields its
    base URL once ``/saes`` answers, stops it afterwards."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("web-server") / "serve.log"
    saereg = Path(sys.executable).with_name("saereg")
    cmd = ([str(saereg)] if saereg.exists()
           else [sys.executable, "-m", "saereg.commands.main"]) + ["serve", "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=_server_env(web_catalog.home), stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`saereg serve` exited with {proc.returncode} before answering; "
                            f"its output:\n{log_path.read_text(errors='replace')[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/saes", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"`saereg serve` did not answer {base}/saes within "
                            f"{SERVER_START_S:.0f} s; its output:\n"
                            f"{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.25)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(f"\nsaereg serve log: {log_path}")


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    """One headless Chromium (``/usr/bin/chromium``, a fresh user-data dir) for the module."""
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900})
        ctx.set_default_timeout(20_000)
        try:
            yield ctx
        finally:
            ctx.close()


@dataclass
class Tab:
    """A browser page with what it saw: dialogs it was asked to show and uncaught JS errors."""

    page: object
    base: str
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def goto(self, path: str):
        return self.page.goto(self.base + path)

    def shot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path


@pytest.fixture
def tab(browser_context, server, request):
    """A fresh page on the module's browser; fails the test on an uncaught page error and
    dismisses (and records) any dialog."""
    page = browser_context.new_page()
    t = Tab(page=page, base=server)

    def on_dialog(d):
        t.dialogs.append(f"{d.type}: {d.message}")
        d.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda e: t.errors.append(str(e)))
    try:
        yield t
        assert t.errors == [], f"uncaught errors in the page: {t.errors}"
    finally:
        page.close()
