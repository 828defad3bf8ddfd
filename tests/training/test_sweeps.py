"""Sparsity sweeps, the dead window, the final checkpoint and resuming a finished job.

One `saereg train --arch relu,jumprelu --target-l0 a,b,c` job trains six SAEs from one model
pass (the data module harvested one SAE's worth of tokens, not six), each with its own MLflow
run, folder and id naming its target; the job writes a checkpoint at its final step even when
the step count is not a multiple of --checkpoint-every; `--resume` of the finished job prints
one line saying so and exits 0, changing nothing. Comma lists of --sparsity-coefficient and
--lr sweep too, and the dead window defaults to a tenth of a short run."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from saereg.commands.main import cli
from saereg.commands.train import train
from saereg.registry.errors import ConfigError
from saereg.registry.paths import runs_dir
from saereg.training.config import SAETrainConfig, TrainConfig
from saereg.training.sweep import sweep

SMALL = ["--expansion", "2", "--context-size", "64", "--batch-tokens", "512",
         "--buffer-tokens", "2048", "--lm-batch-size", "8", "--eval-tokens", "512",
         "--log-every", "5", "--no-progress"]


def test_one_job_sweeps_target_l0_over_two_architectures(tiny_model_dir, mlflow_store):
    args = ["train", str(tiny_model_dir), "--hook", "model.layers.1", "--arch", "relu,jumprelu",
            "--target-l0", "4,8,16", "--tokens", "10240", *SMALL]  # 20 steps
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (job_dir,) = runs_dir().iterdir()
    job = json.loads((job_dir / "job.json").read_text())
    ids = {f"model_layers_1-{a}-x2-l0_{t}" for a in ("relu", "jumprelu") for t in (4, 8, 16)}
    assert job["status"] == "finished" and set(job["saes"]) == ids
    assert len(set(job["runs"].values())) == 6
    assert {p.name for p in (job_dir / "saes").iterdir()} == ids
    exp = mlflow_store.get_experiment_by_name("sae-registry")
    children = [r for r in mlflow_store.search_runs([exp.experiment_id])
                if "mlflow.parentRunId" in r.data.tags]
    assert {r.info.run_id for r in children} == set(job["runs"].values())
    for run in children:
        assert run.info.status == "FINISHED"
        sid = run.info.run_name
        assert run.data.params["sae.target_l0"] == sid.rsplit("l0_", 1)[1] + ".0"
        assert job["runs"][sid] == run.info.run_id
        history = mlflow_store.get_metric_history(run.info.run_id, "sparsity_coefficient")
        assert len({m.value for m in history}) > 1  # the controller moved the coefficient
    # the final step's checkpoint, although 20 steps are no multiple of --checkpoint-every 100
    ckpt = torch.load(job_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)
    assert ckpt["global_step"] == 20
    harvested = ckpt["ActivationDataModule"]["tokens_harvested"]
    assert 10240 <= harvested < 2 * 10240 + 2048  # one pass for all six SAEs

    before = (job_dir / "job.json").read_text()
    again = CliRunner().invoke(cli, ["train", "--resume", job_dir.name, "--no-progress"])
    assert again.exit_code == 0, again.output
    assert again.output.strip().splitlines() == [
        f"job {job_dir.name} already finished (20 of 20 steps, 6 SAE(s) in "
        f"{job_dir / 'saes'}); nothing to resume"]
    assert (job_dir / "job.json").read_text() == before


def test_coefficient_and_lr_lists_sweep_and_ids_tell_them_apart():
    ctx = train.make_context("train", ["m", "--hook", "1", "--arch", "relu,topk",
                                       "--sparsity-coefficient", "1,5", "--lr", "1e-3,3e-4",
                                       "--k", "8,16"])
    p = ctx.params
    assert p["sparsity_coefficients"] == [1.0, 5.0] and p["lrs"] == [1e-3, 3e-4]
    saes = sweep(["h"], p["archs"], p["ks"], p["expansions"],
                 sparsity_coefficients=p["sparsity_coefficients"], lrs=p["lrs"])
    ids = [s.sae_id() for s in saes]
    assert ids == ["h-relu-x8-c1-lr0p001", "h-relu-x8-c1-lr0p0003", "h-relu-x8-c5-lr0p001",
                   "h-relu-x8-c5-lr0p0003", "h-topk-x8-k8-lr0p001", "h-topk-x8-k8-lr0p0003",
                   "h-topk-x8-k16-lr0p001", "h-topk-x8-k16-lr0p0003"]
    TrainConfig(model="m", saes=saes)  # no two ids collide
    bad = CliRunner().invoke(cli, ["train", "m", "--hook", "1", "--target-l0", "1,x"])
    assert bad.exit_code == 2 and "not a comma-separated list of numbers" in bad.output
    with pytest.raises(ConfigError) as info:
        SAETrainConfig(hook="h", architecture="topk", target_l0=8)
    assert info.value.field == "target_l0" and "takes k" in str(info.value)


def test_dead_window_defaults_to_a_tenth_of_a_short_run():
    spec = SAETrainConfig(hook="h")
    assert spec.dead_window(200_000) == 20_000
    assert spec.dead_window(50_000_000) == 1_000_000
    assert SAETrainConfig(hook="h", dead_tokens=5000).dead_window(50_000_000) == 5000
    result = CliRunner().invoke(cli, ["train", "--help"], terminal_width=200)
    assert "a tenth of the run's tokens" in " ".join(result.output.split())
