"""The training tracker's experiments on the home's own MLflow store keep their artifacts in
SAEREG_HOME, also for a second tracker of the same process (MLflow's set_tracking_uri leaves
MLFLOW_TRACKING_URI in the environment after the first one); a store the user names keeps
MLflow's own artifact default."""

from __future__ import annotations

import os
from pathlib import Path

from saereg.registry.paths import home_tracking_uri, mlflow_artifact_root, saereg_home
from saereg.training.tracking import Tracker


def test_home_store_artifacts_stay_in_the_home(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # where MLflow's default, ./mlruns, would land
    first = Tracker("first")
    assert os.environ.get("MLFLOW_TRACKING_URI") == home_tracking_uri()  # what MLflow left
    second = Tracker("second")
    for tracker, name in ((first, "first"), (second, "second")):
        exp = tracker.client.get_experiment(tracker.experiment_id)
        assert exp.artifact_location == f"{mlflow_artifact_root()}/{name}", exp
        run = tracker.start_run(name, {"p": "1"}, {})
        tracker.client.log_text(run, "hello", "note.txt")
        tracker.finish(run)
    assert not (tmp_path / "mlruns").exists()
    assert sorted(p.name for p in (saereg_home() / "mlartifacts").iterdir()) == ["first",
                                                                                 "second"]


def test_a_named_store_keeps_mlflows_artifact_default(monkeypatch, tmp_path):
    store = tmp_path / "team" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.chdir(tmp_path)
    tracker = Tracker("shared")
    location = tracker.client.get_experiment(tracker.experiment_id).artifact_location
    assert not location.startswith(mlflow_artifact_root()), location
    assert Path(store).is_file()
