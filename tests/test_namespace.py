"""The installed names never collide with a user's own packages.

A scratch project of its own, with packages named ``migrations``, ``training``, ``analysis`` and
``registry`` first on ``sys.path`` (every Alembic or Django project has a ``migrations``),
registers, lists and loads an SAE through the public API (``saereg.*``) in a fresh process.
Each of its packages raises on import, so any of our code that resolved a generic top-level
name to the user's package would fail the run; the catalog's schema must come from our own
migrations (a wrong script location leaves ``no such table: aliases``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

USER_PACKAGES = ("migrations", "training", "analysis", "registry")

CHILD = r"""
import json, sys, warnings
import saereg
from saereg.registry.sae.folder import save_sae
from saereg.registry.sae.modules import SAEConfig, build_sae
import torch

cfg = SAEConfig(d_in=8, d_sae=32, architecture="topk", k=4,
                metadata={"model_name": "tiny-llama", "hook_name": "model.layers.1"})
folder = save_sae(build_sae(cfg, seed=3), sys.argv[1])
info = saereg.register_from_folder(folder, "scratch-sae", tags={"project": "scratch"})
listed = saereg.Catalog().list()
sae = saereg.load_sae("scratch-sae@1")
x = torch.randn(5, 8)
original = build_sae(cfg, seed=3)
same = bool(torch.allclose(sae.decode(sae.encode(x)), original.decode(original.encode(x)), atol=1e-6))
shadowed = sorted(n for n in %r if n in sys.modules)
print(json.dumps({"version": info.number, "listed": [(r.name, r.number) for r in listed],
                  "same": same, "shadowed": shadowed, "saereg": saereg.__file__}))
""" % (USER_PACKAGES,)


@pytest.fixture
def scratch_project(tmp_path) -> Path:
    """A project with its own generic top-level packages, each of which refuses to be imported."""
    root = tmp_path / "scratch-project"
    for name in USER_PACKAGES:
        pkg = root / name
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(
            f"raise ImportError('the user project package {name!r} was imported')\n")
    (root / "migrations" / "env.py").write_text("raise RuntimeError('user env.py ran')\n")
    (root / "migrations" / "versions").mkdir()
    return root


def test_a_project_with_its_own_generic_packages_registers_lists_and_loads(
        scratch_project, mlflow_store, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(scratch_project)  # first on sys.path after the script's own folder
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "sae")], cwd=scratch_project,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["version"] == 1
    assert result["listed"] == [["scratch-sae", 1]]
    assert result["same"] is True
    assert result["shadowed"] == []
    assert Path(result["saereg"]).resolve().is_relative_to(REPO_ROOT)


def test_the_user_packages_really_shadow_the_bare_names(scratch_project):
    """The fixture is hostile: importing one of its names fails, so the test above can fail."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(scratch_project)
    for name in USER_PACKAGES:
        out = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=scratch_project,
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "user project package" in out.stderr


def test_python_dash_m_saereg_runs_the_command_line(scratch_project):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(scratch_project)
    out = subprocess.run([sys.executable, "-m", "saereg", "--help"], cwd=scratch_project, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Usage: saereg" in out.stdout and "train" in out.stdout and "sync" in out.stdout
