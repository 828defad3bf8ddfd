"""Shared test fixtures.

Every test gets its own ``SAEREG_HOME`` and runs with the Hugging Face libraries offline.
A real MLflow SQLite store is migrated once per session and copied into each test that asks
for ``mlflow_store`` (a fresh MLflow database runs its migrations, ~25 s).
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@pytest.fixture(autouse=True)
def saereg_home_dir(tmp_path_factory, monkeypatch):
    """A fresh, empty ``SAEREG_HOME`` per test (outside ``tmp_path``, which stays empty), with
    the hub libraries in offline mode."""
    home = tmp_path_factory.mktemp("saereg-home")
    monkeypatch.setenv("SAEREG_HOME", str(home))
    for var in _OFFLINE_VARS:
        monkeypatch.setenv(var, "1")
    # huggingface_hub and datasets read the offline switches once, at import time; a session
    # fixture may already have imported them, so patch the copies they hold as well.
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets_config, "HF_DATASETS_OFFLINE", True)
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random LLaMA (4 layers, d_model 64, vocab 512) with its own BPE tokenizer, built once."""
    from saereg.training.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_lm(tiny_model_dir):
    """A freshly loaded copy of the tiny LLaMA (hooks and state never leak between tests)."""
    from saereg.training.lm import load_lm

    return load_lm(str(tiny_model_dir))


@pytest.fixture
def corpus_dir(tmp_path):
    """A folder of small real-text files: ``a.txt``, ``b.txt`` (blank-line separated paragraphs)
    and ``sub/c.jsonl`` (rows with ``id``, ``title`` and ``text``); a few KB each."""
    from saereg.training.data import default_corpus

    docs = [text for doc_id, text in default_corpus() if doc_id.startswith("pydoc:")]
    paragraphs = [p.strip() for doc in docs for p in doc.split("\n\n") if len(p.strip()) > 80]
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("\n\n".join(paragraphs[0:12]) + "\n", encoding="utf-8")
    (root / "b.txt").write_text("\n\n".join(paragraphs[12:24]) + "\n", encoding="utf-8")
    with open(root / "sub" / "c.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(paragraphs[24:40]):
            f.write(json.dumps({"id": i, "title": f"paragraph {i}", "text": text}) + "\n")
    return root


@pytest.fixture(scope="session")
def smollm2_conversion(tmp_path_factory):
    """The session's one conversion of the packaged SmolLM2-135M-Instruct (about 20 s): the
    ``SAEREG_HOME`` it was converted into (empty before) and what ``load_lm`` wrote to stderr."""
    import contextlib
    import io
    import os

    from saereg.training.lm import load_lm

    home = tmp_path_factory.mktemp("smollm2-home")
    before = os.environ.get("SAEREG_HOME")
    os.environ["SAEREG_HOME"] = str(home)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            load_lm("smollm2-135m")
    finally:
        if before is None:
            os.environ.pop("SAEREG_HOME", None)
        else:
            os.environ["SAEREG_HOME"] = before
    return home, err.getvalue()


@pytest.fixture(scope="session")
def smollm2_converted(smollm2_conversion):
    """The folder of the session's converted SmolLM2 (never written to by tests)."""
    home, _ = smollm2_conversion
    return home / "models" / "smollm2-135m"


@pytest.fixture
def smollm2(smollm2_converted, saereg_home_dir):
    """This test's SAEREG_HOME with the converted SmolLM2 already in its model cache."""
    models = saereg_home_dir / "models"
    models.mkdir(exist_ok=True)
    (models / "smollm2-135m").symlink_to(smollm2_converted, target_is_directory=True)
    return "smollm2-135m"


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory):
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(mlflow_template, monkeypatch):
    """The default tracking store of this test's SAEREG_HOME, already migrated."""
    from mlflow import MlflowClient

    from saereg.registry.paths import mlflow_tracking_uri, saereg_home

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("SAEREG_ARTIFACT_STORE", raising=False)
    shutil.copy(mlflow_template, saereg_home() / "mlflow.db")
    return MlflowClient(tracking_uri=mlflow_tracking_uri())
