"""Steering presets on the tiny LLaMA, on SQLite and PostgreSQL: a preset survives a round
trip and editing makes a new version; steering along a feature's decoder direction at a large
strength raises the probability of that feature's top logit-lens token; `saereg steer` prints
default and steered side by side and stores both, and the stored outputs reproduce with the
same seed (sampling on); clamp sets the feature's activation; bad input (a feature of another
model, an index out of range, a prompt longer than the context) is one clear error and
nothing is stored."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from feature_helpers import register_tiny_sae
from sqlalchemy import func, select

from saereg.analysis.steering import apply_preset, create_preset, get_preset, steer, stored_runs
from saereg.commands.main import cli
from saereg.registry.catalog import db
from saereg.registry.catalog.feature_schema import SteeringPreset, SteeringRun
from saereg.registry.errors import UsageError

PROMPT = "Should I travel by plane or by"


def counts() -> tuple[int, int]:
    with db.session() as s:
        return (s.scalar(select(func.count()).select_from(SteeringPreset)),
                s.scalar(select(func.count()).select_from(SteeringRun)))


def test_preset_round_trip_and_steering_raises_top_logit(tiny_sae, tiny_lm):
    from saereg.registry.api import load_sae

    p1 = create_preset("travel", tiny_sae, [(None, 5, 200.0)],
                       generation={"max_new_tokens": 6, "temperature": 1.0, "seed": 3})
    got = get_preset("travel")
    assert (got.name, got.number, got.ref, got.method) == ("travel", 1, tiny_sae, "add")
    assert got.features == [{"sae": tiny_sae, "version_id": p1.features[0]["version_id"],
                             "hook": "model.layers.1", "index": 5, "strength": 200.0}]
    assert got.generation == {"max_new_tokens": 6, "temperature": 1.0, "top_k": 0, "seed": 3}
    p2 = create_preset("travel", method="clamp")
    assert p2.number == 2 and p2.features == p1.features and p2.generation == p1.generation
    assert get_preset("travel@1").method == "add" and get_preset("travel").method == "clamp"

    sae = load_sae(tiny_sae)
    w_u = tiny_lm.model.get_output_embeddings().weight.detach()
    target = int((sae.W_dec[5].detach() @ w_u.T).argmax())
    ids = tiny_lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]

    def prob() -> tuple[float, int]:
        with torch.no_grad():
            probs = tiny_lm.model(ids).logits[0, -1].softmax(-1)
        return float(probs[target]), int(probs.argmax())

    base, base_best = prob()
    with apply_preset(tiny_lm, get_preset("travel@1")):
        steered, steered_best = prob()
    # the tiny model's logits are small (near-uniform softmax): the steered run makes the
    # feature's top logit-lens token the most likely one, which it was not before
    assert steered > base * 1.4 and steered_best == target != base_best
    assert prob()[0] == pytest.approx(base)  # removed on exit

    seen = {}
    def grab(_m, _a, out):
        seen["acts"] = sae.encode(out[0] if isinstance(out, tuple) else out)[..., 5]
    layer = dict(tiny_lm.model.named_modules())["model.layers.1"]
    with apply_preset(tiny_lm, get_preset("travel@2")):
        handle = layer.register_forward_hook(grab)
        try:
            with torch.no_grad():
                tiny_lm.model(ids)
        finally:
            handle.remove()
    assert seen["acts"].min() > 100  # clamped towards 200 (TopK may re-rank, but it is large)

    r = CliRunner().invoke(cli, ["steer", "--preset", "travel@1", PROMPT])
    assert r.exit_code == 0, r.output
    assert "default" in r.output and "steered (travel@1, seed 3)" in r.output
    (run,) = stored_runs("travel@1")
    again = steer("travel@1", PROMPT, store=False, lm=tiny_lm)
    assert (again.default, again.steered) == (run.default_text, run.steered_text)
    assert run.seed == 3 and run.default_text != run.steered_text


def test_bad_input_stores_nothing(tiny_sae, tiny_lm, tmp_path):
    other = register_tiny_sae("/nonexistent/other-model", tmp_path, "other-sae")
    create_preset("ok", tiny_sae, [(None, 1, 4.0)])
    before = counts()
    with pytest.raises(UsageError, match="belongs to model"):
        create_preset("mixed", tiny_sae, [(None, 1, 4.0), (other, 2, 4.0)])
    with pytest.raises(UsageError, match="out of range"):
        create_preset("ok", tiny_sae, [(None, 96, 4.0)])
    with pytest.raises(UsageError, match="longer than the model's context"):
        steer("ok", "word " * 5000, lm=tiny_lm)
    r = CliRunner().invoke(cli, ["preset", "create", "x", "--sae", tiny_sae, "--feature",
                                 f"{other}:3", "--strength", "2"])
    assert r.exit_code == 2 and "belongs to model" in r.output
    r = CliRunner().invoke(cli, ["steer", "--preset", "nope", "hello"])
    assert r.exit_code == 1 and "unknown preset" in r.output
    assert counts() == before
