"""The decoder refit of relu SAEs (SAETrainConfig.decoder_refit): in the last share of the run
the code is frozen (each token keeps the latents it fires and the L0 the controller reached),
the sparsity coefficient stops, and only W_dec learns, with its norms folded into the encoder
after every step, so rows stay unit-norm. Checked on a real job's module and data module over
a planted-feature cache: everything but the decoder and the activations' scale is as it was
when the refit began, and the reconstruction of the same inputs is better."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from saereg.registry.errors import ConfigError
from saereg.training.config import SAETrainConfig, TrainConfig
from saereg.training.planted import HOOK, PlantedFeatures, fit_in_process, write_planted_cache

STEPS, BATCH = 80, 512


class AtRefitStart(L.Callback):
    """Keeps a copy of every SAE's state and the controller's coefficient at the batch that
    starts its refit."""

    def __init__(self):
        self.state, self.coefficient = {}, {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        for sid, sae in module.saes.items():
            if sid not in self.state and module.in_refit(sid, trainer.global_step):
                self.state[sid] = {k: v.detach().clone() for k, v in sae.state_dict().items()}
                self.coefficient[sid] = float(module.control[sid].coefficient)


def test_refit_holds_the_code_and_refits_the_decoder(tmp_path):
    features = PlantedFeatures(n_features=64, d=32, seed=2)
    folder = write_planted_cache(features, tmp_path / "cache", 20_000, heldout=1024,
                                 shard_tokens=10_000)
    spec = SAETrainConfig(hook=HOOK, architecture="relu", expansion=2, target_l0=3,
                          decoder_refit=0.25)
    cfg = TrainConfig(model="planted-features", saes=[spec], tokens=STEPS * BATCH,
                      batch_tokens=BATCH, buffer_tokens=10_000, from_cache=str(folder),
                      log_every=10**6)
    snap = AtRefitStart()
    module = fit_in_process(cfg, callbacks=[snap])
    (sid, sae), = module.saes.items()
    assert module.refit_steps[sid] == STEPS // 4
    assert not module.in_refit(sid, STEPS - STEPS // 4 - 1) and module.in_refit(sid, STEPS - 1)
    before = type(sae)(sae.cfg)
    before.load_state_dict(snap.state[sid])
    sae, before = sae.eval(), before.eval()
    x, _ = features.sample(4096, seed=77)
    with torch.no_grad():
        acts, acts0 = sae.encode(x), before.encode(x)
        assert torch.equal(acts > 0, acts0 > 0)  # the same latents fire on every input
        assert 0 < float((acts > 0).float().mean()) < 0.5
        assert torch.equal(sae.b_dec, before.b_dec)  # held: the encoder subtracts it
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.d_sae))
        cos = torch.nn.functional.cosine_similarity(sae.W_enc, before.W_enc, dim=0)
        assert float(cos.min()) > 1 - 1e-5  # encoder columns only rescaled
        assert float(sae.W_enc.norm(dim=0).div(before.W_enc.norm(dim=0)).max()) > 1.05
        err = (sae(x) - x).pow(2).sum()
        err0 = (before(x) - x).pow(2).sum()
    assert float(err) < 0.9 * float(err0), (float(err), float(err0))
    assert float(module.control[sid].coefficient) == snap.coefficient[sid]


def test_refit_schedule():
    """Before the refit the whole schedule runs over the steps that precede it (warm-up, decay
    to 0 at its start); in it the main group restarts at decoder_refit_lr and decays to 0,
    while the biases' group stays at 0."""
    from saereg.training.module import SAETrainingModule

    specs = [SAETrainConfig(hook=HOOK, architecture="relu", expansion=2, lr=1e-3,
                            decoder_refit=0.2, decoder_refit_lr=5e-3),
             SAETrainConfig(hook=HOOK, architecture="topk", expansion=2, k=3, lr=1e-3)]
    cfg = TrainConfig(model="planted-features", saes=specs, tokens=100 * BATCH,
                      batch_tokens=BATCH, buffer_tokens=10_000, lr_warmup_steps=0)
    module = SAETrainingModule(cfg.to_dict(), {HOOK: 16})
    groups = {name: (sid, lr) for name, sid, _, lr in module.param_groups()}
    relu, topk = specs[0].sae_id(), specs[1].sae_id()
    assert module.refit_steps == {relu: 20, topk: 0}

    def factor(name, step):
        return module.group_lr_factor(name, *groups[name], step)

    # the relu SAE's 80 steps decay over their last 16 (lr_decay_fraction 0.2)
    assert factor(relu, 63) == 1.0 and factor(relu, 72) == pytest.approx(0.5)
    assert factor(f"{relu}/biases", 79) == pytest.approx(1 / 16)
    assert factor(relu, 80) == pytest.approx(5.0) and factor(relu, 99) == pytest.approx(0.25)
    assert factor(f"{relu}/biases", 80) == 0.0 and factor(f"{relu}/biases", 99) == 0.0
    assert factor(topk, 79) == 1.0 and factor(topk, 90) == pytest.approx(0.5)


@pytest.mark.parametrize("change, field", [
    (dict(architecture="topk", decoder_refit=0.1), "decoder_refit"),
    (dict(architecture="relu", decoder_refit=1.0), "decoder_refit"),
    (dict(architecture="relu", decoder_refit=float("nan")), "decoder_refit"),
    (dict(architecture="relu", decoder_refit_lr=float("inf")), "decoder_refit_lr"),
    (dict(architecture="relu", sparsity_coefficient=float("nan")), "sparsity_coefficient"),
    (dict(architecture="jumprelu", preact_coefficient=float("inf")), "preact_coefficient"),
])
def test_bad_refit_settings_are_refused(change, field):
    with pytest.raises(ConfigError) as e:
        SAETrainConfig(hook=HOOK, **change)
    assert e.value.field == field and field in str(e.value)


def test_refit_defaults():
    """On for relu (a tenth of the run, at 3x the SAE's lr), off for the others."""
    relu = SAETrainConfig(hook=HOOK, architecture="relu")
    assert relu.refit_of() == 0.1 and relu.refit_steps(488) == 49
    assert relu.refit_lr_of(64) == pytest.approx(3 * relu.default_lr(64))
    for arch in ("jumprelu", "gated", "topk", "batchtopk", "matryoshka"):
        assert SAETrainConfig(hook=HOOK, architecture=arch).refit_steps(488) == 0, arch
    assert SAETrainConfig(hook=HOOK, architecture="relu", decoder_refit=0).refit_steps(488) == 0
    assert relu.refit_steps(1) == 0  # a one-step run has nothing to refit after
