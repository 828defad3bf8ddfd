"""MLflow wiring: one run per SAE under a parent run per job.

The tracking URI follows DESIGN.md: ``MLFLOW_TRACKING_URI`` wins, otherwise a SQLite store in
SAEREG_HOME with artifacts next to it. Metrics are buffered and sent with ``log_batch``. Secrets
never reach a param, a tag or a message: params, tags and error texts go through ``redact``;
a failing MLflow call becomes one ``SaeRegError`` naming the store without its credentials; and
MLflow's own "View run at <url>" lines are not printed for a URI that carries credentials
(MLflow would print them with the password).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L

from saereg.registry.catalog.mlflow_mirror import ensure_tracking_store
from saereg.registry.errors import SaeRegError, TrainingInterrupted, redact
from saereg.registry.paths import home_tracking_uri, mlflow_artifact_root

_NO_URL_PRINT = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"

FLUSH_SECONDS = 10.0  # metrics reach the store at least this often
DEAD_LOG10 = -10.0  # log10(rate + 1e-10) of a latent that never fired


class Tracker:
    """Thin layer over ``mlflow.MlflowClient`` for the runs of one training job."""

    def __init__(self, experiment: str, tracking_uri: str | None = None):
        import mlflow
        from mlflow import MlflowClient

        self.uri = ensure_tracking_store(tracking_uri)  # creates a new SQLite store once
        # The home's own store keeps its artifacts in the home (not ./mlruns): known by its URI,
        # since mlflow.set_tracking_uri (below) writes MLFLOW_TRACKING_URI into the environment,
        # and a later tracker of this process finds it set
        home_store = self.uri == home_tracking_uri()
        self.shown_uri = redact(self.uri)
        """The URI as messages show it (credentials masked)."""
        self._pending: dict[str, list] = {}
        with self._errors(f"opening experiment {experiment!r}"):
            mlflow.set_tracking_uri(self.uri)
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                kwargs = {}
                if home_store:
                    kwargs["artifact_location"] = f"{mlflow_artifact_root()}/{experiment}"
                self.experiment_id = self.client.create_experiment(experiment, **kwargs)
            else:
                self.experiment_id = exp.experiment_id
        self._last_flush = time.monotonic()

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Any failure of an MLflow call -> one SaeRegError, redacted (MLflow's messages hold
        the request URL, credentials included). MLflow's run-URL lines are held back while a
        URI with credentials is in use."""
        quiet = self.shown_uri != self.uri and _NO_URL_PRINT not in os.environ
        if quiet:
            os.environ[_NO_URL_PRINT] = "true"
        try:
            yield
        except SaeRegError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the tracking store
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SaeRegError(f"MLflow tracking at {self.shown_uri}: {what} failed: "
                              f"{redact(first)[:400]}") from None
        finally:
            if quiet:
                os.environ.pop(_NO_URL_PRINT, None)

    def start_run(self, name: str, params: dict[str, str], tags: dict[str, str],
                  parent_id: str | None = None) -> str:
        from mlflow.entities import Param

        tags = {k: redact(v) for k, v in tags.items()}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        with self._errors(f"creating run {name!r}"):
            run = self.client.create_run(self.experiment_id, run_name=redact(name), tags=tags)
            rid = run.info.run_id
            items = [Param(k, redact(v)) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(rid, params=items[i:i + 100])
        return rid

    def reopen(self, run_id: str) -> None:
        with self._errors(f"reopening run {run_id}"):
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
            with self._errors(f"logging metrics of run {rid}"):
                for i in range(0, len(buf), 1000):
                    self.client.log_batch(rid, metrics=buf[i:i + 1000])

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str | None = None) -> None:
        with self._errors(f"uploading {Path(local_dir).name}/ to run {run_id}"):
            self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_artifact(self, run_id: str, local_file: Path, artifact_path: str | None = None) -> None:
        with self._errors(f"uploading {Path(local_file).name} to run {run_id}"):
            self.client.log_artifact(run_id, str(local_file), artifact_path)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        with self._errors(f"tagging run {run_id}"):
            self.client.set_tag(run_id, key, redact(value))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.flush(run_id)
        with self._errors(f"closing run {run_id}"):
            self.client.set_terminated(run_id, status=status)

    def status(self, run_id: str) -> str:
        with self._errors(f"reading run {run_id}"):
            return self.client.get_run(run_id).info.status


class TrackingCallback(L.Callback):
    """Sends the module's step metrics to each SAE's run; marks every run FAILED on error
    (KILLED on Ctrl-C)."""

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
        """Close every run: KILLED when Ctrl-C stopped the job, otherwise FAILED."""
        interrupted = isinstance(exception, (KeyboardInterrupt, TrainingInterrupted))
        for rid in [*self.run_ids.values(), self.parent_id]:
            if rid is None:
                continue
            try:
                self.tracker.flush(rid)
                if exception is not None:
                    self.tracker.set_tag(rid, "error", redact(exception)[:5000])
                self.tracker.finish(rid, status="KILLED" if interrupted else "FAILED")
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

