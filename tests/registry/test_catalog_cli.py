"""`saereg sae`, `saereg db` and `saereg gc` end to end: a real tiny training run is registered
from its MLflow run id, listed with its key metrics, shown with its lineage, diffed, aliased,
deprecated and exported; another process with nothing but SAEREG_HOME (or
SAEREG_DATABASE_URL) set loads it by alias in one call, without importing MLflow; `saereg
--help` and `saereg sae --help` import neither torch nor MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from catalog_helpers import make_sae_folder
from click.testing import CliRunner

from saereg.commands.main import cli
from saereg.registry.paths import runs_dir

SMALL = ["--k", "8", "--expansion", "4", "--context-size", "64", "--batch-tokens", "512",
         "--buffer-tokens", "2048", "--lm-batch-size", "8", "--eval-tokens", "1024",
         "--log-every", "4", "--no-progress", "--tokens", "8192"]


def run(*args: str):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


def test_help_stays_light():
    code = textwrap.dedent("""
        import sys
        from saereg.commands.main import cli
        for args in (["--help"], ["sae", "--help"], ["db", "--help"], ["sae", "alias", "--help"]):
            try:
                cli.main(args, prog_name="saereg", standalone_mode=False)
            except SystemExit:
                pass
        heavy = [m for m in ("torch", "mlflow", "transformers", "lightning") if m in sys.modules]
        print("HEAVY", heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout, out.stdout[-2000:]
    for command in ("register", "list", "show", "diff", "alias", "deprecate", "export"):
        assert command in out.stdout


def test_trained_run_registered_listed_shown_and_loaded_elsewhere(
        backend, mlflow_store, tiny_model_dir, tmp_path):
    result = run("train", str(tiny_model_dir), "--hook", "model.layers.1", *SMALL)
    assert result.exit_code == 0, result.output
    job = json.loads(next(runs_dir().glob("*/job.json")).read_text())
    (run_id,) = job["runs"].values()

    result = run("sae", "register", "--run", run_id, "--name", "tiny-l1", "--tag", "sweep=a",
                 "--note", "first real run")
    assert result.exit_code == 0, result.output
    assert "registered tiny-l1@1" in result.output
    folder = make_sae_folder(tmp_path / "other", d_in=64, d_sae=256, k=8, seed=7,
                             model=json.loads(
                                 (runs_dir() / job["job_id"] / "saes" / next(iter(job["saes"]))
                                  / "cfg.json").read_text())["metadata"]["model_name"])
    result = run("sae", "register", str(folder), "--name", "tiny-l1", "--parent", "tiny-l1@1")
    assert result.exit_code == 0, result.output

    result = run("sae", "list", "--json")
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["ref"] for r in rows] == ["tiny-l1@1", "tiny-l1@2"]
    assert rows[0]["explained_variance"] is not None and rows[0]["l0"] is not None
    assert rows[0]["ce_loss_score"] is not None and rows[0]["dead_fraction"] is not None
    result = run("sae", "list", "--tag", "sweep=a")
    assert "tiny-l1@1" in result.output and "tiny-l1@2" not in result.output
    assert "EV" in result.output and "CE score" in result.output

    result = run("sae", "show", "tiny-l1@1")
    for text in (run_id, "sae_weights.safetensors", "eval/ce_loss_score", "8,192",
                 "first real run", "sweep=a"):
        assert text in result.output, text
    shown = json.loads(run("sae", "show", "tiny-l1@2", "--json").output)
    assert shown["parent"] == "tiny-l1@1" and shown["mlflow_model_version"] == "2"

    result = run("sae", "diff", "tiny-l1@1", "tiny-l1@2")
    assert result.exit_code == 0 and "lineage.parent" in result.output

    assert run("sae", "alias", "set", "tiny-l1", "prod", "1").exit_code == 0
    assert run("sae", "alias", "set", "tiny-l1", "prod", "2").exit_code == 0
    assert "1 -> 2" in run("sae", "alias", "history", "tiny-l1").output
    assert run("sae", "deprecate", "tiny-l1@2", "--reason", "random weights").exit_code == 0
    assert run("sae", "alias", "set", "tiny-l1", "prod", "1").exit_code == 0

    result = CliRunner().invoke(cli, ["sae", "export", "tiny-l1@2", str(tmp_path / "exp")])
    assert result.exit_code == 0 and "deprecated" in result.output
    assert (tmp_path / "exp" / "sae_weights.safetensors").is_file()

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "SAEREG_ARTIFACT"))}
    code = textwrap.dedent("""
        import sys, torch
        from saereg import load_sae
        sae = load_sae("tiny-l1@prod", device="cpu", dtype=torch.float64)
        print(sae.cfg.metadata["saereg_ref"], sae.W_enc.dtype, sae.cfg.d_sae,
              "mlflow" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["tiny-l1@1", "torch.float64", "256", "False"]

    assert "would remove 0 blob(s)" in run("gc", "--dry-run", "--min-age", "0").output
    assert run("gc", "--min-age", "soon").exit_code == 2


@pytest.mark.parametrize("args", [["sae", "show", "missing"], ["sae", "diff", "a", "b"],
                                  ["sae", "alias", "history", "missing"]])
def test_errors_are_one_line_exit_1(backend, mlflow_store, args):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert result.output.startswith("Error: unknown SAE") and result.output.count("\n") == 1
