"""Data-parallel training: `saereg train --devices 2 --strategy ddp` on CPU (gloo) runs two real
processes through Lightning's launcher and makes one job: one folder, one MLflow run per SAE
plus the parent (all FINISHED), one SAE folder that loads. Each process trained on half of the
token budget, from different windows; both ended with bit-identical state, and the saved SAE is
exactly that state. A DDP job killed mid-way resumes from its checkpoint in the same runs; NaN
stops both processes at the same step, reported once and recorded as FAILED. The window and
cache-row sharding partitions the data, and bad --devices / --strategy values exit 2 before
anything is created."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from saereg.commands.main import cli
from saereg.registry.paths import runs_dir
from saereg.registry.sae.folder import load_sae
from train_helpers import first_checkpoint

REPO = Path(__file__).resolve().parents[2]
HOOK = "model.layers.1"
SMALL = ["--hook", HOOK, "--k", "8", "--expansion", "4", "--context-size", "64",
         "--batch-tokens", "512", "--buffer-tokens", "2048", "--lm-batch-size", "4",
         "--eval-tokens", "512", "--log-every", "2", "--device", "cpu", "--no-progress"]
DDP = ["--devices", "2", "--strategy", "ddp"]


def saereg(args, **kwargs):
    """`saereg ARGS` in a new process (Lightning's launcher re-runs this command line for rank 1)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.Popen([sys.executable, "-m", "saereg.commands.main", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def all_runs(client):
    exp = client.get_experiment_by_name("sae-registry")
    return client.search_runs([exp.experiment_id]) if exp else []


def test_two_processes_train_one_job(tiny_model_dir, mlflow_store, tmp_path):
    proc = saereg(["train", str(tiny_model_dir), *SMALL, *DDP, "--tokens", "4096"], cwd=tmp_path)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-4000:]
    assert out.count("finished: 1 SAE(s)") == 1  # rank 1 printed no summary

    (job_dir,) = runs_dir().iterdir()
    job = json.loads((job_dir / "job.json").read_text())
    assert job["status"] == "finished" and job["config"]["devices"] == 2
    r0, r1 = job["ranks"]
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["tokens"] > 0 and r1["tokens"] > 0
    assert r0["tokens"] + r1["tokens"] == 4096  # the budget once, over both processes
    assert r0["data_sha256"] != r1["data_sha256"]  # different windows
    assert r0["state_sha256"] == r1["state_sha256"]  # parameters, firing stats, counters
    assert r0["sae_sha256"] == r1["sae_sha256"]

    runs = all_runs(mlflow_store)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 2 and len(children) == 1
    assert {r.info.status for r in runs} == {"FINISHED"}
    (child,) = children
    assert child.info.run_id == job["runs"][f"{HOOK.replace('.', '_')}-topk-x4-k8"]
    assert child.data.params["job.devices"] == "2" and child.data.params["job.strategy"] == "ddp"
    history = mlflow_store.get_metric_history(child.info.run_id, "tokens_seen")
    assert max(m.step for m in history) == 8  # 4096 // 512 steps
    assert max(m.value for m in history) == 4096  # counts the tokens of both processes

    (sid, folder) = next(iter(job["saes"].items()))
    assert [p.name for p in (job_dir / "saes").iterdir()] == [sid]
    sae = load_sae(folder)
    assert sae.cfg.d_sae == 256 and sae.cfg.k == 8
    from saereg.training.distributed import tensors_sha256

    saved = load_file(str(Path(folder) / "sae_weights.safetensors"))
    assert tensors_sha256(saved) == r0["sae_sha256"][sid]  # what both processes agreed on


def test_decoder_refit_under_ddp(tiny_model_dir, mlflow_store, tmp_path):
    """A relu SAE whose second half refits its decoder: the held parameters get zero
    gradients for DDP's reduction and none for Adam, so both processes end identical."""
    args = [a for a in SMALL if a not in ("--k", "8")]
    proc = saereg(["train", str(tiny_model_dir), *args, *DDP, "--arch", "relu",
                   "--decoder-refit", "0.5", "--tokens", "4096"], cwd=tmp_path)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-4000:]
    (job_dir,) = runs_dir().iterdir()
    job = json.loads((job_dir / "job.json").read_text())
    r0, r1 = job["ranks"]
    assert r0["data_sha256"] != r1["data_sha256"]
    assert r0["state_sha256"] == r1["state_sha256"]
    (folder,) = job["saes"].values()
    sae = load_sae(folder)
    assert sae.cfg.architecture == "relu"
    # unit rows in training; the saved folder divides them by the normalisation scale
    norms = sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, float(norms[0])))


def test_split_revival_under_ddp(tiny_model_dir, mlflow_store, tmp_path):
    """A TopK job's split revival round (after step 64 of 125: rounds are 32768 tokens apart)
    runs on rank 0's sample and its moves reach rank 1: latents moved, both processes end
    identical."""
    proc = saereg(["train", str(tiny_model_dir), *SMALL, *DDP, "--tokens", "64k",
                   "--revive-share", "0.5"], cwd=tmp_path)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-4000:]
    (job_dir,) = runs_dir().iterdir()
    job = json.loads((job_dir / "job.json").read_text())
    r0, r1 = job["ranks"]
    assert r0["state_sha256"] == r1["state_sha256"]
    (run_id,) = job["runs"].values()
    moved = {m.step: m.value for m in mlflow_store.get_metric_history(run_id, "revived_latents")}
    assert moved[64] == 0 and moved[66] > 0  # logged every 2 steps; the round after step 64


def test_killed_ddp_job_resumes(tiny_model_dir, mlflow_store, tmp_path):
    proc = saereg(["train", str(tiny_model_dir), *SMALL, *DDP, "--tokens", "64k",
                   "--checkpoint-every", "10"], cwd=tmp_path, start_new_session=True)
    ckpt = first_checkpoint(proc)
    os.killpg(proc.pid, signal.SIGKILL)  # both processes: they share the session
    out = proc.communicate()[0].decode()
    assert ckpt is not None, out[-3000:]
    job_dir = ckpt.parent.parent
    job = json.loads((job_dir / "job.json").read_text())
    assert job["status"] == "running"
    (run_id,) = job["runs"].values()
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < step < 125

    proc = saereg(["train", "--resume", str(job_dir), "--no-progress"], cwd=tmp_path)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-4000:]
    job = json.loads((job_dir / "job.json").read_text())
    assert job["status"] == "finished" and list(job["runs"].values()) == [run_id]
    assert [d.name for d in runs_dir().iterdir()] == [job_dir.name]
    runs = all_runs(mlflow_store)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    history = mlflow_store.get_metric_history(run_id, "tokens_seen")
    assert max(m.step for m in history) == 125  # 64k // 512 steps in all
    r0, r1 = job["ranks"]  # each process continued after the checkpoint, not from the start
    assert r0["tokens"] == r1["tokens"] == (125 - step) * 256
    assert r0["state_sha256"] == r1["state_sha256"]


def test_divergence_stops_both_processes(tiny_model_dir, mlflow_store, tmp_path):
    proc = saereg(["train", str(tiny_model_dir), *SMALL, *DDP, "--tokens", "20k", "--lr", "1e30",
                   "--checkpoint-every", "1"], cwd=tmp_path)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 1, out[-4000:]
    assert out.count("non-finite") == 1 and HOOK in out  # reported once, by rank 0
    (job_dir,) = runs_dir().iterdir()
    job = json.loads((job_dir / "job.json").read_text())
    assert job["status"] == "failed" and "non-finite" in job["error"]
    assert (job_dir / "checkpoints" / "last.ckpt").is_file() and not (job_dir / "saes").exists()
    runs = all_runs(mlflow_store)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}


def test_windows_are_split_between_ranks(tiny_lm):
    from saereg.training.data import TokenWindows

    def ids(n, **kw):
        return [w.input_ids for w in islice(TokenWindows(tiny_lm.tokenizer, 32, **kw), n)]

    every = ids(40)
    r0, r1 = ids(20, rank=0, world_size=2), ids(20, rank=1, world_size=2)
    assert all(torch.equal(a, b) for a, b in zip(r0, every[0::2], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(r1, every[1::2], strict=True))
    later = TokenWindows(tiny_lm.tokenizer, 32, skip_windows=7, rank=1, world_size=2)
    first = next(iter(later))
    assert torch.equal(first.input_ids, every[7]) and later.position == 8


def test_cache_rows_are_split_between_ranks(tiny_lm, tmp_path):
    from saereg.training.cache import load_shard, write_cache

    m = write_cache(tiny_lm, [HOOK], tmp_path / "acts", 600, context_size=32, lm_batch_size=4,
                    shard_tokens=300, heldout_tokens=0, progress=False)
    for shard in m["shards"]:
        full = load_shard(tmp_path / "acts", shard["file"], [HOOK])
        parts = [load_shard(tmp_path / "acts", shard["file"], [HOOK], rank=r, world_size=3)
                 for r in range(3)]
        for key in (HOOK, "token_ids"):
            assert torch.equal(torch.cat([p[key] for p in parts]), full[key])
        assert all(p["token_ids"].shape[0] > 0 for p in parts)


@pytest.mark.parametrize("args, message", [
    (["--devices", "0"], "--devices"),
    (["--num-nodes", "0"], "--num-nodes"),
    (["--strategy", "fsdp"], "--strategy"),
    (["--strategy", "ddp_spawn"], "use ddp"),
    (["--devices", "3", "--batch-tokens", "512"], "--batch-tokens"),
    (["--devices", "2", "--device", "cuda:1"], "--device cuda:1"),
])
def test_bad_parallel_options_exit_2(tiny_model_dir, args, message):
    result = CliRunner().invoke(cli, ["train", str(tiny_model_dir), "--hook", HOOK,
                                      "--no-progress", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not runs_dir().exists() or not any(runs_dir().iterdir())
