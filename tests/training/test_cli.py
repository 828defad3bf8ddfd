"""The training CLI: `saereg --help` loads no heavy library, `models hooks` lists hook points
with shapes, a sweep trains every combination of architecture and k from one pass, and
MLFLOW_TRACKING_URI decides where runs go."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from saereg.commands.main import cli
from saereg.registry.paths import runs_dir


def test_help_imports_no_heavy_library():
    """`saereg --help` and the --help of every command and group below it import none of the
    heavy libraries."""
    code = ("import sys, click; from saereg.commands.main import cli\n"
            "def walk(cmd, path):\n"
            "    yield path\n"
            "    for name, sub in getattr(cmd, 'commands', {}).items():\n"
            "        yield from walk(sub, [*path, name])\n"
            "paths = list(walk(cli, []))\n"
            "for path in paths:\n"
            "    try:\n        cli([*path, '--help'], prog_name='saereg')\n"
            "    except SystemExit as e:\n        assert e.code == 0, (path, e.code)\n"
            "print('CHECKED', len(paths), ' '.join('/'.join(p) for p in paths))\n"
            "heavy = [m for m in ('torch', 'transformers', 'mlflow', 'lightning', 'datasets')"
            " if m in sys.modules]\nprint('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "quickstart" in out.stdout
    checked = out.stdout.split("CHECKED ", 1)[1].splitlines()[0].split()
    assert int(checked[0]) > 30  # every group and command, nested ones too
    assert {"train", "cache", "sae", "sae/import", "sae/convert", "sae/alias/set", "db/upgrade",
            "sync/push", "models/hooks"} <= set(checked[1:])
    assert "HEAVY []" in out.stdout


def test_python_m_saereg_runs_the_command_line():
    out = subprocess.run([sys.executable, "-m", "saereg", "train", "--help"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("Usage: saereg train")


def test_models_hooks_lists_layers_with_shapes(tiny_model_dir):
    result = CliRunner().invoke(cli, ["models", "hooks", str(tiny_model_dir)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "model.layers.1 " in result.output
    row = next(line for line in result.output.splitlines() if "model.layers.1 " in line)
    assert "64" in row  # hidden size of the tiny model
    filtered = CliRunner().invoke(cli, ["models", "hooks", str(tiny_model_dir), "--filter", "mlp"],
                                  terminal_width=200)
    assert "model.layers.0.mlp" in filtered.output and "model.layers.0.self_attn " not in filtered.output


def test_sweep_trains_every_combination_from_one_pass(tiny_model_dir, mlflow_store, monkeypatch,
                                                      tmp_path):
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    import shutil

    from saereg.registry.paths import saereg_home

    shutil.copy(saereg_home() / "mlflow.db", tmp_path / "elsewhere.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # a store named by URI keeps MLflow's artifact default, ./mlruns
    result = CliRunner().invoke(cli, [
        "train", str(tiny_model_dir), "--hook", "1", "--arch", "topk,relu", "--k", "4,8",
        "--expansion", "2", "--tokens", "2048", "--batch-tokens", "512", "--buffer-tokens", "1024",
        "--context-size", "32", "--eval-tokens", "256", "--no-progress"])
    assert result.exit_code == 0, result.output
    job = json.loads(next(runs_dir().glob("*/job.json")).read_text())
    assert sorted(job["saes"]) == ["model_layers_1-relu-x2", "model_layers_1-topk-x2-k4",
                                   "model_layers_1-topk-x2-k8"]
    from mlflow import MlflowClient

    elsewhere = MlflowClient(tracking_uri=uri)
    exp = elsewhere.get_experiment_by_name("sae-registry")
    assert len(elsewhere.search_runs([exp.experiment_id])) == 4  # parent + 3
    assert mlflow_store.get_experiment_by_name("sae-registry") is None  # nothing in the default store
    assert (tmp_path / "mlruns" / exp.experiment_id).is_dir()


def test_train_register_puts_the_sae_in_the_catalog(tiny_model_dir, mlflow_store):
    import torch

    from saereg import get_version, load_sae

    result = CliRunner().invoke(cli, [
        "train", str(tiny_model_dir), "--hook", "2", "--k", "4", "--expansion", "2",
        "--tokens", "2048", "--batch-tokens", "512", "--buffer-tokens", "1024",
        "--context-size", "32", "--eval-tokens", "256", "--no-progress", "--register", "tiny-l2"])
    assert result.exit_code == 0, result.output
    assert "registered tiny-l2@1" in result.output
    job = json.loads(next(runs_dir().glob("*/job.json")).read_text())
    (run_id,) = job["runs"].values()
    (folder,) = job["saes"].values()
    info = get_version("tiny-l2")
    assert info.number == 1 and info.mlflow_run_id == run_id
    from saereg.registry.sae.folder import load_sae as load_folder

    x = torch.randn(5, 64)
    torch.testing.assert_close(load_sae("tiny-l2@1")(x), load_folder(folder)(x))
