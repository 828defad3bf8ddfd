"""A training job from start to finish: validate, track, train, evaluate, save.

Everything that can be checked is checked before anything is created (model, hooks, k < d_sae,
token budget). A job lives in ``$SAEREG_HOME/runs/<job id>/``: ``job.json`` (config, MLflow run
ids, status), ``checkpoints/last.ckpt`` (every ``checkpoint_every`` steps and at the final
step) and, when finished, ``saes/<sae id>/`` in the SAELens
layout. A job that stops early keeps its last good checkpoint; an error or NaN marks it
``"failed"`` and its MLflow runs FAILED, Ctrl-C marks it ``"interrupted"`` and its runs KILLED
(the CLI exits 130); ``resume`` continues it with the same step count and runs.

Data-parallel jobs (``devices x num_nodes`` > 1) run this in every process; only global rank 0
does the above, the other processes just train (see :mod:`saereg.training.distributed`). Their
``job.json`` also lists, per process (``ranks``), the tokens it trained on, its position in the
data and digests of the token ids it read and of its final state.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from saereg.registry.errors import (ConfigError, SaeRegError, TrainingDivergedError,
                                    TrainingInterrupted, redact)
from saereg.registry.paths import runs_dir
from saereg.training.config import TrainConfig, flat_params
from saereg.training.corpus import DEFAULT_CORPUS_NAME, dataset_name
from saereg.training.finish import SAEResult, finish, sae_metadata
from saereg.training.interrupt import sigint_raises


@dataclass
class TrainResult:
    job_dir: Path
    parent_run_id: str
    tracking_uri: str
    """Where the runs are, as shown to people: credentials in it are masked (see ``redact``)."""
    saes: list[SAEResult]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_job(job_dir: Path) -> dict[str, Any]:
    f = Path(job_dir) / "job.json"
    if not f.is_file():
        raise ConfigError(f"{job_dir} is not a training job folder (no job.json)")
    return json.loads(f.read_text())


def finished_message(job_dir: Path) -> str | None:
    """The one line that says the job in ``job_dir`` already finished (None while it has not):
    its steps and where its SAEs are."""
    state = read_job(job_dir)
    if state.get("status") != "finished":
        return None
    steps = TrainConfig.from_dict(state["config"]).total_steps
    return (f"job {Path(job_dir).name} already finished ({steps} of {steps} steps, "
            f"{len(state.get('saes', {}))} SAE(s) in {Path(job_dir) / 'saes'}); nothing to resume")


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine")
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def prepare_cache(cfg: TrainConfig, device: str | None = None):
    """Read the cache's manifest (it stands in for the model) and check every SAE against it;
    returns (resolved config, source, d_ins). The resolved config is a copy of ``cfg`` with the
    cache's model, context size and dataset, and hook names as the cache records them; ``cfg``
    itself is left as it was."""
    import torch

    from saereg.training.cache import CacheSource, read_manifest

    manifest = read_manifest(cfg.from_cache)
    source = CacheSource(Path(cfg.from_cache).expanduser().resolve(), manifest,
                         torch.device(device or resolve_device(cfg.device)))
    known = source.hooks
    saes = []
    for spec in cfg.saes:
        if spec.hook not in known:
            by_layer = [h for h in known if h.rsplit(".", 1)[-1] == spec.hook.strip()]
            if len(by_layer) != 1:
                raise ConfigError(f"hook {spec.hook} is not in the cache {cfg.from_cache}; it "
                                  f"holds {', '.join(known)}", field="hook")
            spec = replace(spec, hook=by_layer[0])
        spec.resolve(source.d_ins[spec.hook])
        saes.append(spec)
    dataset = cfg.dataset
    if manifest.get("dataset") != DEFAULT_CORPUS_NAME:
        dataset = manifest.get("dataset")
    context = manifest["context_size"] or cfg.context_size  # null: rows imported from a file
    resolved = replace(cfg, model=manifest["model"], context_size=int(context),
                       dataset=dataset, saes=saes)  # runs the config's checks again
    resolved.check_budget()
    return resolved, source, {h: source.d_ins[h] for h in resolved.hooks}


def prepare(cfg: TrainConfig, device: str | None = None):
    """Load the model (on ``device``, default: from the config) and check every SAE against
    it, then the token budget; returns (resolved config, lm, d_ins). The resolved config is a
    copy of ``cfg`` with every hook as a module path (``"6"`` -> ``model.layers.6``); ``cfg``
    itself is left as it was."""
    from saereg.registry.sae.modules import torch_dtype
    from saereg.training.config import LM_DTYPES
    from saereg.training.lm import hook_dim, load_lm, resolve_hooks

    if cfg.from_cache:
        return prepare_cache(cfg, device)
    device = device or resolve_device(cfg.device)
    dtype = torch_dtype(cfg.dtype, LM_DTYPES)
    check_dataset(cfg)
    lm = load_lm(cfg.model, device=device, dtype=dtype)
    paths = dict(zip(cfg.hooks, resolve_hooks(lm, cfg.hooks)))
    saes = [replace(spec, hook=paths[spec.hook]) for spec in cfg.saes]
    d_ins = {h: hook_dim(lm, h) for h in paths.values()}
    for spec in saes:
        spec.resolve(d_ins[spec.hook])
    if cfg.context_size > lm.context_limit:
        raise ConfigError(f"context_size {cfg.context_size} exceeds the model's limit "
                          f"({lm.context_limit})", field="context_size")
    resolved = replace(cfg, saes=saes)  # runs the config's checks again, on the module paths
    resolved.check_budget()
    return resolved, lm, d_ins


def check_dataset(cfg: TrainConfig) -> None:
    """Read the first document now, so a bad dataset fails before anything is created."""
    from saereg.registry.errors import DatasetError
    from saereg.training.data import iter_documents

    if next(iter(iter_documents(cfg.dataset, text_column=cfg.text_column)), None) is None:
        raise DatasetError(f"dataset {cfg.dataset} has no documents")


def make_trainer(cfg: TrainConfig, device: str, job_dir: Path):
    """The Lightning trainer of a job: one device, or DDP over devices x num_nodes processes."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from saereg.training.distributed import RankReport, make_strategy

    class Checkpoint(L.pytorch.callbacks.ModelCheckpoint):
        """Every checkpoint_every steps, and once more at the final step (on every process:
        saving gathers the data positions of all of them)."""

        def on_train_end(self, trainer, pl_module) -> None:
            super().on_train_end(trainer, pl_module)
            step = trainer.global_step
            if step >= cfg.total_steps and self._last_global_step_saved != step:
                trainer.save_checkpoint(str(Path(self.dirpath) / "last.ckpt"))
                self._last_global_step_saved = step

    checkpoint = Checkpoint(
        dirpath=job_dir / "checkpoints", filename="last", every_n_train_steps=cfg.checkpoint_every,
        save_top_k=1, enable_version_counter=False)
    extra = [RankReport()] if cfg.world_size > 1 else []
    try:
        return L.Trainer(max_steps=cfg.total_steps, max_epochs=-1,
                         accelerator="gpu" if device.startswith("cuda") else "cpu",
                         devices=cfg.devices, num_nodes=cfg.num_nodes,
                         strategy=make_strategy(cfg), precision=cfg.precision,
                         logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=job_dir, callbacks=[*extra, checkpoint])
    except MisconfigurationException as e:  # e.g. more --devices than this machine has
        raise ConfigError(f"--devices {cfg.devices} --num-nodes {cfg.num_nodes} on {device}: "
                          f"{e}") from e


def _rank_report(trainer) -> list[dict[str, Any]] | None:
    from saereg.training.distributed import RankReport

    return next((c.ranks for c in trainer.callbacks if isinstance(c, RankReport)), None)


def run_training(cfg: TrainConfig | None = None, *, resume: Path | None = None,
                 progress: bool = True, progress_stream=None) -> TrainResult | None:
    """Train every SAE in ``cfg`` from one pass; or continue the job folder ``resume``.

    Under DDP every process runs this; the ones of global rank > 0 train and return None."""
    import logging

    from saereg.training.distributed import JOB_ENV, barrier
    from saereg.training.module import ActivationDataModule, SAETrainingModule
    from saereg.training.progress import ProgressCallback
    from saereg.training.tracking import Tracker, TrackingCallback

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    state: dict[str, Any]
    if resume is not None:
        job_dir = Path(resume)
        state = read_job(job_dir)
        done = finished_message(job_dir)
        if done:
            raise ConfigError(done)
        cfg = TrainConfig.from_dict(state["config"])
    elif cfg is None:
        raise ConfigError("run_training needs a config or a job folder to resume")
    else:
        job_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        job_dir = runs_dir() / job_id
    device = resolve_device(cfg.device)
    trainer = make_trainer(cfg, device, job_dir)
    if device.startswith("cuda") and trainer.world_size > 1:
        device = str(trainer.strategy.root_device)  # this process's GPU
    cfg, lm, d_ins = prepare(cfg, device)
    ckpt = job_dir / "checkpoints" / "last.ckpt"
    ckpt_path = str(ckpt) if resume and ckpt.exists() else None
    if trainer.global_rank != 0:
        return train_worker(cfg, lm, d_ins, trainer, ckpt_path)

    if resume is None:
        job_dir.mkdir(parents=True)
        state = {"job_id": job_id, "config": cfg.to_dict(), "status": "running", "runs": {}}
        _write_json(job_dir / "job.json", state)

    tracking = None
    with sigint_raises():
        try:
            tracker = Tracker(cfg.experiment)
            parent, runs = _open_runs(tracker, cfg, lm, state, job_dir)
            metadata = {spec.sae_id(): sae_metadata(cfg, lm, spec, runs[spec.sae_id()])
                        for spec in cfg.saes}
            module = SAETrainingModule(cfg.to_dict(), d_ins, metadata)
            dm = ActivationDataModule(lm, cfg, cache=lm if cfg.from_cache else None)
            tracking = TrackingCallback(tracker, runs, parent)
            trainer.callbacks.insert(0, tracking)  # the checkpoint callback stays last
            if progress:
                trainer.callbacks.insert(0, ProgressCallback(cfg.tokens, cfg.batch_tokens,
                                                             stream=progress_stream))
            if cfg.world_size > 1:
                os.environ[JOB_ENV] = str(job_dir.resolve())  # the processes Lightning starts attach
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
            if trainer.interrupted or trainer.global_step < cfg.total_steps:
                raise SaeRegError(f"training stopped at step {trainer.global_step} of "
                                  f"{cfg.total_steps}; resume with: saereg train --resume {job_dir}")
            ranks = _rank_report(trainer)
            if ranks:
                state["ranks"] = ranks  # what each process trained on, and its final state digest
            results = finish(cfg, lm, module, tracker, runs, job_dir, progress_stream)
            tracker.finish(parent)
        except TrainingInterrupted:
            raise _interrupted(cfg, trainer, tracking, state, job_dir) from None
        except BaseException as e:
            if tracking is not None:
                tracking.mark_failed(e)
            state["status"] = "failed"
            state["error"] = redact(e)[:2000]
            _write_json(job_dir / "job.json", state)
            if isinstance(e, TrainingDivergedError):
                barrier()  # the other processes stop at the same step; they exit after this
            raise
        finally:
            os.environ.pop(JOB_ENV, None)
    state.update(status="finished", saes={r.sae_id: str(r.folder) for r in results})
    _write_json(job_dir / "job.json", state)
    return TrainResult(job_dir=job_dir, parent_run_id=parent, tracking_uri=redact(tracker.uri),
                       saes=results)


def _open_runs(tracker, cfg: TrainConfig, lm, state: dict[str, Any],
               job_dir: Path) -> tuple[str, dict[str, str]]:
    """The job's parent run and one run per SAE: created on the job's first start (also when
    an earlier start stopped before it had any), reopened on resume."""
    state["status"] = "running"
    state.pop("error", None)
    state.pop("stopped_at_step", None)
    if state.get("parent_run"):
        parent, runs = state["parent_run"], state["runs"]
        for rid in [parent, *runs.values()]:
            tracker.reopen(rid)
        _write_json(job_dir / "job.json", state)
        return parent, runs
    imported = bool(cfg.from_cache) and lm.imported  # rows from a file: no dataset or context
    parent = tracker.start_run(cfg.run_name or f"job {state['job_id']}",
                               {"model": cfg.model,
                                "dataset": "" if imported else dataset_name(cfg.dataset),
                                "tokens": str(cfg.tokens), "n_saes": str(len(cfg.saes))},
                               {"saereg.job_id": state["job_id"], "model": lm.name})
    runs = {}
    for spec in cfg.saes:
        runs[spec.sae_id()] = tracker.start_run(
            spec.sae_id(), {**flat_params(cfg, spec), **({"job.context_size": ""} if imported
                                                         else {})},
            {"model": lm.name, "hook": spec.hook, "architecture": spec.architecture,
             "saereg.job_id": state["job_id"]}, parent_id=parent)
    state.update(parent_run=parent, runs=runs)
    _write_json(job_dir / "job.json", state)
    return parent, runs


def _interrupted(cfg: TrainConfig, trainer, tracking, state: dict[str, Any],
                 job_dir: Path) -> TrainingInterrupted:
    """Record a job that Ctrl-C stopped (job.json ``"interrupted"``, its runs KILLED, its
    checkpoint kept) and return the one-line error that says how to resume it."""
    step = int(trainer.global_step)
    job_id = state["job_id"]
    has_ckpt = (job_dir / "checkpoints" / "last.ckpt").is_file()
    message = (f"training job {job_id} interrupted at step {step} of {cfg.total_steps}; "
               + ("its last checkpoint is kept" if has_ckpt else "no checkpoint yet, it restarts "
                  "from step 0") + f"; resume with: saereg train --resume {job_id}")
    if tracking is not None:
        tracking.mark_failed(TrainingInterrupted(message))
    kill = getattr(trainer.strategy.launcher, "kill", None)
    if cfg.world_size > 1 and kill is not None:
        kill(getattr(signal, "SIGKILL", signal.SIGTERM))  # the processes Lightning started
    state.update(status="interrupted", stopped_at_step=step)
    state.pop("error", None)
    _write_json(job_dir / "job.json", state)
    return TrainingInterrupted(message)


def train_worker(cfg: TrainConfig, lm, d_ins: dict[str, int], trainer, ckpt_path: str | None):
    """A process of global rank > 0: train alongside rank 0 and return None. It creates no job
    folder and no MLflow run; rank 0 checkpoints, evaluates, saves and logs."""
    from saereg.training.distributed import JOB_ENV, barrier
    from saereg.training.module import ActivationDataModule, SAETrainingModule

    attached = os.environ.get(JOB_ENV)
    if attached and Path(attached).is_dir():
        theirs = TrainConfig.from_dict(read_job(Path(attached))["config"]).to_dict()
        if theirs != TrainConfig.from_dict(cfg.to_dict()).to_dict():
            raise ConfigError(f"this process's training settings differ from those of job "
                              f"{Path(attached).name}; every process must run the same command")
    module = SAETrainingModule(cfg.to_dict(), d_ins)
    dm = ActivationDataModule(lm, cfg, cache=lm if cfg.from_cache else None)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except TrainingDivergedError:
        barrier()  # every process stopped at this step; rank 0 has now recorded it
        if attached:  # started by rank 0, which reports the failure; a non-zero exit here
            return None  # would make Lightning's launcher kill rank 0 before it exits
        raise
    if trainer.interrupted or trainer.global_step < cfg.total_steps:
        raise SaeRegError(f"training stopped at step {trainer.global_step} of {cfg.total_steps}")
    return None
