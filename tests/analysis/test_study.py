"""explain-prompt, neighbors and eval on the tiny LLaMA (SQLite and PostgreSQL): explain-prompt
lists each token's top features (the real top activations) with their labels and refuses a
prompt longer than the context; neighbors are the true decoder-cosine nearest features, are
stored once computed (and reused), work across versions on the same hook and refuse another
hook; eval stores its metrics on the version and the same figures in an MLflow run."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from feature_helpers import register_tiny_sae
from sqlalchemy import func, select

from saereg.analysis.labels import add_label
from saereg.analysis.neighbors import evaluate, neighbors
from saereg.analysis.prompt import explain_prompt
from saereg.commands.main import cli
from saereg.registry.catalog import db
from saereg.registry.catalog.feature_schema import FeatureNeighbor, VersionEval
from saereg.registry.errors import UsageError

PROMPT = "Would you be able to travel through time using a wormhole?"


def test_explain_prompt(tiny_sae, tiny_lm):
    from saereg.registry.api import load_sae
    from saereg.training.lm import ActivationCapture

    ids = tiny_lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        acts = load_sae(tiny_sae).encode(
            ActivationCapture(tiny_lm, ["model.layers.1"])(ids)["model.layers.1"])[0]
    best = int(acts[3].argmax())
    add_label(tiny_sae, best, "time travel words")
    rows = explain_prompt(PROMPT, tiny_sae, top=3)
    assert len(rows) == ids.shape[1]
    assert rows[3].features[0][:2] == (best, pytest.approx(float(acts[3].max()), rel=1e-5))
    assert rows[3].features[0][2] == "time travel words"
    r = CliRunner().invoke(cli, ["explain-prompt", PROMPT, "--sae", tiny_sae])
    assert r.exit_code == 0 and "time travel words" in r.output
    with pytest.raises(UsageError, match="longer than the model's context"):
        explain_prompt("time " * 5000, tiny_sae)


def test_neighbors_are_stored_and_cross_version(tiny_sae, tiny_model_dir, tmp_path):
    from saereg.registry.api import load_sae

    v2 = register_tiny_sae(tiny_model_dir, tmp_path, seed=1)
    w = load_sae(tiny_sae).W_dec.detach()
    wn = w / w.norm(dim=1, keepdim=True)
    cos = wn @ wn[4]
    cos[4] = -2
    got = neighbors(tiny_sae, 4, k=5)
    assert [n.index for n in got] == cos.topk(5).indices.tolist()
    assert got[0].cosine == pytest.approx(float(cos.max()), rel=1e-5)
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(FeatureNeighbor)) == 5
    assert neighbors(tiny_sae, 4, k=3) == got[:3]  # reused
    w2 = load_sae(v2).W_dec.detach()
    across = neighbors(tiny_sae, 4, other=v2, k=3)
    cos2 = (w2 / w2.norm(dim=1, keepdim=True)) @ wn[4]
    assert [n.index for n in across] == cos2.topk(3).indices.tolist() and across[0].ref == v2
    other_hook = register_tiny_sae(tiny_model_dir, tmp_path, "hook2", hook="model.layers.2")
    with pytest.raises(UsageError, match="not comparable"):
        neighbors(tiny_sae, 4, other=other_hook)
    r = CliRunner().invoke(cli, ["neighbors", tiny_sae, "4", "--in", v2, "-k", "2"])
    assert r.exit_code == 0 and r.output.count(v2) == 2


def test_eval_stores_on_version_and_mlflow(tiny_sae, mlflow_store):
    out = evaluate(tiny_sae, tokens=512, context_size=32)
    for key in ("ce_loss_score", "kl_div", "explained_variance", "l0", "dead_fraction",
                "shrinkage"):
        assert key in out
    assert 0 < out["l0"] <= 8
    with db.session() as s:
        (row,) = s.scalars(select(VersionEval)).all()
    assert row.metrics["l0"] == out["l0"] and row.mlflow_run_id == out["mlflow_run_id"]
    run = mlflow_store.get_run(row.mlflow_run_id)
    assert run.data.metrics["eval/l0"] == pytest.approx(out["l0"])
    assert run.data.tags["saereg.version"] == tiny_sae
