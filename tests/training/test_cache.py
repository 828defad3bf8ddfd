"""The activation cache: `saereg cache` stores exactly the activations and token ids that the
model stream would give (bit-exact round trip), with provenance in its manifest; an interrupted
cache is refused by training with one clear error and finished by running the command again;
`saereg train --from-cache` trains a sweep without loading the model and records the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from saereg.commands.main import cli
from saereg.registry.paths import runs_dir

HOOKS = ["model.layers.1", "model.layers.2"]


def make_cache(model_dir, out, tokens="3000", extra=()):
    args = ["cache", str(model_dir), "--hook", HOOKS[0], "--hook", "2", "--tokens", tokens,
            "--out", str(out), "--context-size", "32", "--lm-batch-size", "4",
            "--shard-tokens", "1000", "--heldout-tokens", "256", *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_cache_round_trip_is_bit_exact(tiny_model_dir, tmp_path):
    from saereg.training.data import TokenWindows
    from saereg.training.lm import ActivationCapture, load_lm, special_token_mask

    out = tmp_path / "acts"
    result = make_cache(tiny_model_dir, out)
    assert result.exit_code == 0, result.output
    assert "tok/s" in result.output and "ETA" in result.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["hooks"] == HOOKS and m["d_in"] == {h: 64 for h in HOOKS}
    assert m["model"] == str(tiny_model_dir) and m["context_size"] == 32
    assert m["dataset"] == "saereg:default-corpus" and m["tokenizer"]["vocab_size"] == 512
    assert m["tokens"] >= 3000 and len(m["shards"]) >= 3
    assert sum(s["tokens"] for s in m["shards"]) == m["tokens"]
    assert m["heldout"]["tokens"] >= 256
    assert not list(out.glob(".*.tmp"))

    lm = load_lm(str(tiny_model_dir))
    capture = ActivationCapture(lm, HOOKS)
    batches = TokenWindows(lm.tokenizer, 32).batches(4)
    for shard in m["shards"]:
        data = load_file(str(out / shard["file"]))
        start, end = shard["windows"]
        ids = torch.cat([next(batches)[0] for _ in range((end - start) // 4)])
        keep = ~special_token_mask(lm.tokenizer, ids)
        acts = capture(ids)
        assert torch.equal(data["token_ids"], ids[keep])
        for h in HOOKS:
            assert torch.equal(data[h], acts[h][keep])


def test_interrupted_cache_is_refused_then_resumed(tiny_model_dir, tmp_path, mlflow_store,
                                                   monkeypatch):
    import saereg.training.cache as cache_mod

    out = tmp_path / "acts"
    real = cache_mod._save_atomic
    calls = {"n": 0}

    def dying(tensors, path, metadata):
        calls["n"] += 1
        if calls["n"] == 3:
            real(tensors, path.with_name(f".{path.name}.tmp"), metadata)  # half-written shard
            raise RuntimeError("killed")
        real(tensors, path, metadata)

    monkeypatch.setattr(cache_mod, "_save_atomic", dying)
    with pytest.raises(RuntimeError, match="killed"):
        make_cache(tiny_model_dir, out)
    m = json.loads((out / "manifest.json").read_text())
    assert not m["complete"] and len(m["shards"]) == 2

    result = CliRunner().invoke(cli, ["train", "--from-cache", str(out), "--k", "4",
                                      "--expansion", "2", "--tokens", "1024",
                                      "--batch-tokens", "512", "--no-progress"])
    assert result.exit_code == 2 and "incomplete" in result.output
    assert "saereg cache" in result.output
    assert not runs_dir().exists() or not any(runs_dir().iterdir())

    monkeypatch.setattr(cache_mod, "_save_atomic", real)
    result = make_cache(tiny_model_dir, out)
    assert result.exit_code == 0, result.output
    m2 = json.loads((out / "manifest.json").read_text())
    assert m2["complete"] and m2["shards"][:2] == m["shards"]
    # shard 3 continues where shard 2 ended: the same windows a fresh cache would have
    fresh = tmp_path / "fresh"
    assert make_cache(tiny_model_dir, fresh).exit_code == 0
    f = json.loads((fresh / "manifest.json").read_text())
    assert [s["windows"] for s in f["shards"]] == [s["windows"] for s in m2["shards"]]
    for a, b in zip(f["shards"], m2["shards"]):
        assert torch.equal(load_file(str(fresh / a["file"]))["token_ids"],
                           load_file(str(out / b["file"]))["token_ids"])
    other = make_cache(tiny_model_dir, out, extra=("--context-size", "16"))
    assert other.exit_code == 2 and "context_size" in other.output


def test_train_sweep_from_cache_without_the_model(tiny_model_dir, tmp_path, mlflow_store,
                                                  monkeypatch):
    out = tmp_path / "acts"
    assert make_cache(tiny_model_dir, out, tokens="4096").exit_code == 0
    import saereg.training.lm

    def no_model(*a, **k):
        raise AssertionError("training from a cache must not load the model")

    monkeypatch.setattr(saereg.training.lm, "load_lm", no_model)
    result = CliRunner().invoke(cli, [
        "train", "--from-cache", str(out), "--hook", "1", "--hook", "model.layers.2",
        "--k", "4,8", "--expansion", "2", "--tokens", "6144", "--batch-tokens", "512",
        "--buffer-tokens", "1024", "--no-progress"])
    assert result.exit_code == 0, result.output
    job = json.loads(next(runs_dir().glob("*/job.json")).read_text())
    assert len(job["saes"]) == 4 and job["status"] == "finished"
    exp = mlflow_store.get_experiment_by_name("sae-registry")
    runs = mlflow_store.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4
    for run in children:
        assert run.data.params["job.from_cache"] == str(out)
        assert run.data.tags["model"] == str(tiny_model_dir)
        assert 0.0 < run.data.metrics["eval/explained_variance"] <= 1.0
        assert run.data.metrics["eval/l0"] <= 8.01
        assert max(h.step for h in mlflow_store.get_metric_history(run.info.run_id, "l0")) == 12
    folder = next(iter(job["saes"].values()))
    cfg = json.loads((Path(folder) / "cfg.json").read_text())
    assert cfg["metadata"]["activation_cache"] == str(out)
    assert cfg["metadata"]["model_name"] == str(tiny_model_dir)


@pytest.mark.parametrize("args, message", [
    (["--hook", "model.layers.3"], "not in the cache"),
    (["--from-cache", "/no/such/cache"], "not an activation cache"),
])
def test_bad_cache_input(tiny_model_dir, tmp_path, mlflow_store, args, message):
    out = tmp_path / "acts"
    assert make_cache(tiny_model_dir, out, tokens="1000").exit_code == 0
    base = ["train", "--from-cache", str(out), "--tokens", "1024", "--batch-tokens", "512",
            "--no-progress"]
    result = CliRunner().invoke(cli, base + args)
    assert result.exit_code in (1, 2), result.output
    assert message in result.output
    assert not runs_dir().exists() or not any(runs_dir().iterdir())
