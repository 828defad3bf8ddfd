"""MLflow wiring: one run per SAE under a parent run per job.

The tracking URI follows DESIGN.md: ``MLFLOW_TRACKING_URI`` wins, otherwise a SQLite store in
SAEREG_HOME with artifacts next to it. Metrics are buffered and sent with ``log_batch``. Secrets
never reach a param: configs hold no tokens, and values are cut to MLflow's length limit.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
import lightning as L

from saereg.registry.paths import mlflow_artifact_root, mlflow_tracking_uri

FLUSH_SECONDS = 10.0  # metrics reach the store at least this often
DEAD_LOG10 = -10.0  # log10(rate + 1e-10) of a latent that never fired


class Tracker:
    """Thin layer over ``mlflow.MlflowClient`` for the runs of one training job."""

    def __init__(self, experiment: str, tracking_uri: str | None = None):
        import mlflow
        from mlflow import MlflowClient

        self.uri = tracking_uri or mlflow_tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            kwargs = {}
            if self.uri.startswith("sqlite:") and "MLFLOW_TRACKING_URI" not in os.environ:
                kwargs["artifact_location"] = f"{mlflow_artifact_root()}/{experiment}"
            self.experiment_id = self.client.create_experiment(experiment, **kwargs)
        else:
            self.experiment_id = exp.experiment_id
        self._pending: dict[str, list] = {}
        self._last_flush = time.monotonic()

    def start_run(self, name: str, params: dict[str, str], tags: dict[str, str],
                  parent_id: str | None = None) -> str:
        tags = dict(tags)
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        rid = run.info.run_id
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(rid, params=items[i:i + 100])
        return rid

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        buf = self._pending.setdefault(run_id, [])
        buf.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
        if len(buf) >= 1000 or time.monotonic() - self._last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self, run_id: str | None = None) -> None:
        self._last_flush = time.monotonic()
        for rid in [run_id] if run_id else list(self._pending):
            buf = self._pending.pop(rid, [])
            for i in range(0, len(buf), 1000):
                self.client.log_batch(rid, metrics=buf[i:i + 1000])

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_artifact(self, run_id: str, local_file: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(local_file), artifact_path)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.flush(run_id)
        self.client.set_terminated(run_id, status=status)

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status


class TrackingCallback(L.Callback):
    """Sends the module's step metrics to each SAE's run; marks every run FAILED on error."""

    def __init__(self, tracker: Tracker, run_ids: dict[str, str], parent_id: str | None):
        self.tracker = tracker
        self.run_ids = run_ids
        self.parent_id = parent_id

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not pl_module.step_metrics:
            return
        step = int(trainer.global_step)
        for sid, metrics in pl_module.step_metrics.items():
            self.tracker.log_metrics(self.run_ids[sid], metrics, step)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.tracker.flush()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.mark_failed(exception)

    def mark_failed(self, exception: BaseException | None = None) -> None:
        for rid in [*self.run_ids.values(), self.parent_id]:
            if rid is None:
                continue
            try:
                self.tracker.flush(rid)
                if exception is not None:
                    self.tracker.client.set_tag(rid, "error", str(exception)[:5000])
                self.tracker.client.set_terminated(rid, status="FAILED")
            except Exception:  # noqa: BLE001 - never hide the original error
                pass


def density_histogram_png(log10_rate, path: Path, title: str) -> Path:
    """Histogram of log10 firing rates (dead latents at the left edge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.asarray(log10_rate, dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.hist(values, bins=60, color="#3a6ea5", edgecolor="white", linewidth=0.3)
    n_dead = int((values <= DEAD_LOG10 + 0.01).sum())
    ax.set_xlabel("log10 firing rate (fraction of tokens)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}\n{values.size} latents, {n_dead} never fired in the counting window")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

