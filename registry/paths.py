"""Where things live: SAEREG_HOME and the paths under it."""

from __future__ import annotations

import os
from pathlib import Path


def saereg_home() -> Path:
    """``$SAEREG_HOME`` (default ``~/.saereg``), created on first use."""
    home = Path(os.environ.get("SAEREG_HOME") or Path.home() / ".saereg").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def models_dir() -> Path:
    return saereg_home() / "models"


def runs_dir() -> Path:
    """Training jobs: checkpoints, job state and the SAE folders they produce."""
    return saereg_home() / "runs"


def mlflow_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` wins; otherwise a SQLite store in SAEREG_HOME.

    Only the address: open a store through
    :func:`saereg.registry.catalog.mlflow_mirror.ensure_tracking_store`, which creates a new
    SQLite store once even when many processes open it together."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return home_tracking_uri()


def home_tracking_uri() -> str:
    """The SQLite tracking store in SAEREG_HOME (the store when MLFLOW_TRACKING_URI is unset)."""
    return f"sqlite:///{saereg_home() / 'mlflow.db'}"


def mlflow_artifact_root() -> str:
    """Artifact root for experiments this project creates on the default store."""
    return (saereg_home() / "mlartifacts").as_uri()
