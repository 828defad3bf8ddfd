"""A job checkpointed by an earlier version, whose Adam groups were one per SAE and one per
JumpReLU threshold (before the encoder biases of relu, jumprelu and gated SAEs had a group of
their own), resumes: data/pre_bias_group.ckpt was written halfway through its 20 steps by
data/make_half_trained_checkpoint.py with that version, and is resumed here with this one.
Every parameter keeps its own Adam moments and step count, the biases move to their group at
their rate, and the LR schedule follows the new groups."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
import make_half_trained_checkpoint as maker  # noqa: E402

from saereg.training.module import DECODER_PARAMETERS  # noqa: E402


def test_resume_regroups_an_earlier_optimizer_layout(tmp_path, capfd):
    saved = torch.load(DATA / "pre_bias_group.ckpt", weights_only=False)
    old = saved["optimizer_states"][0]
    trainer, module, dm = maker.trainer_and_module(maker.job(tmp_path / "cache"), maker.STEPS)
    # the earlier layout, by hand: each SAE's parameters but its threshold, then the threshold
    expected = {}
    for group in old["param_groups"]:
        sid, _, part = group["name"].partition("/")
        names = ["threshold"] if part else [n for n, _ in module.saes[sid].named_parameters()
                                            if n != "threshold"]
        for name, index in zip(names, group["params"]):
            expected[(sid, name)] = old["state"][index]
    assert ("planted-relu-x2", "b_enc") in expected and len(old["param_groups"]) == 5

    loaded = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            opt = trainer.optimizers[0]
            for sid, sae in pl_module.saes.items():
                for name, p in sae.named_parameters():
                    loaded[(sid, name)] = {k: v.clone() for k, v in opt.state[p].items()}

    trainer.callbacks.append(Snapshot())
    trainer.fit(module, datamodule=dm, ckpt_path=str(DATA / "pre_bias_group.ckpt"))
    assert "earlier optimizer layout" in capfd.readouterr().err
    assert trainer.global_step == maker.STEPS
    assert loaded.keys() == expected.keys()
    for key, state in expected.items():  # each parameter found its own moments
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(loaded[key][k], state[k], msg=lambda m: f"{key} {k}: {m}")
    opt = trainer.optimizers[0]
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == [g[0] for g in module.param_groups()]
    for name, sid, params, lr in module.param_groups():
        group = groups[name]
        assert group["initial_lr"] == pytest.approx(lr), name
        own = dict(module.saes[sid].named_parameters())
        assert [id(p) for p in group["params"]] == [id(own[n]) for n in params], name
        for n in params:  # the saved steps and the resumed ones; the decoder refit holds
            held = 0 if n in DECODER_PARAMETERS else module.refit_steps[sid]  # all but W_dec
            assert float(opt.state[own[n]]["step"]) == maker.STEPS - held, (name, n)
    assert module.refit_steps["planted-relu-x2"] == 2  # a tenth of the 20 steps
    relu = "planted-relu-x2"
    assert groups[f"{relu}/biases"]["initial_lr"] == pytest.approx(
        4 * groups[relu]["initial_lr"])  # x sqrt(d_in), d_in 16
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.base_lrs == [g["initial_lr"] for g in opt.param_groups]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [lr * module.group_lr_factor(name, sid, lr, sched.last_epoch)
         for name, sid, _, lr in module.param_groups()])


def test_a_checkpoint_of_other_saes_is_refused(tmp_path):
    """Groups that name no SAE of the job, or hold another number of parameters, are refused
    with the group's name, before anything is loaded."""
    from saereg.registry.errors import ConfigError

    _, module, _ = maker.trainer_and_module(maker.job(tmp_path / "cache"), maker.STEPS)
    for change, message in ((lambda g: g.update(name="planted-relu-x4"), "planted-relu-x4"),
                            (lambda g: g["params"].pop(), "holds 3 parameters")):
        saved = torch.load(DATA / "pre_bias_group.ckpt", weights_only=False)
        change(saved["optimizer_states"][0]["param_groups"][0])
        with pytest.raises(ConfigError, match=message):
            module.on_load_checkpoint(saved)
