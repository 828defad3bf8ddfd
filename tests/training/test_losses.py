"""Training losses and the Lightning module on toy data: the JumpReLU threshold gets a
gradient from the straight-through estimator, AuxK trains dead latents, gated and matryoshka
losses are finite and fall, the k schedule anneals, decoder rows stay unit-norm, and a TopK SAE
recovers planted sparse directions from superposed toy activations (>= 90% at cosine >= 0.9)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from saereg.registry.errors import ConfigError
from saereg.registry.sae.modules import SAEConfig, build_sae
from saereg.training.config import SAETrainConfig, TrainConfig
from saereg.training.losses import LossSettings, compute_loss, k_at
from saereg.training.module import SAETrainingModule

HOOK = "toy"


@pytest.fixture(autouse=True)
def one_thread():
    """Toy matrices are tiny: one thread avoids oversubscription on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_data(n_features=64, d=32, n=40_000, p_active=0.04, seed=0):
    """Sparse combinations of planted unit directions in a lower-dimensional space."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_features, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    active = torch.rand(n, n_features, generator=g) < p_active
    mags = 1 + torch.rand(n, n_features, generator=g)
    return (active * mags) @ dirs, dirs


class DictLoader(torch.utils.data.IterableDataset):
    def __init__(self, x, batch, steps, seed=0):
        self.x, self.batch, self.steps, self.seed = x, batch, steps, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.steps):
            idx = torch.randint(0, self.x.shape[0], (self.batch,), generator=g)
            yield {HOOK: self.x[idx]}


def train_toy(specs, x, steps=600, batch=512, **job):
    cfg = TrainConfig(model="toy", saes=specs, tokens=steps * batch, batch_tokens=batch,
                      buffer_tokens=batch, log_every=1, lr_warmup_steps=10, **job)
    module = SAETrainingModule(cfg.to_dict(), {HOOK: x.shape[1]})
    module.initialize_from({HOOK: x[:4096]})
    history = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, b, i):
            history.append({sid: dict(m) for sid, m in pl_module.step_metrics.items()})

    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[Record()], accelerator="cpu")
    loader = torch.utils.data.DataLoader(DictLoader(x, batch, steps), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return module, history


def test_topk_recovers_planted_directions():
    x, dirs = toy_data()
    spec = SAETrainConfig(hook=HOOK, architecture="topk", k=4, d_sae=128, lr=3e-3,
                          dead_tokens=20_000)
    module, history = train_toy([spec], x, steps=1500)
    sae = module.saes[spec.sae_id()]
    cos = torch.nn.functional.normalize(sae.W_dec, dim=1) @ dirs.T  # [d_sae, n_features]
    recovered = (cos.max(0).values >= 0.9).float().mean().item()
    assert recovered >= 0.9, f"recovered only {recovered:.2%} of planted directions"
    assert history[-1][spec.sae_id()]["explained_variance"] > 0.8
    norms = sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


@pytest.mark.parametrize("arch", ["gated", "matryoshka", "relu", "jumprelu", "batchtopk"])
def test_losses_finite_and_falling(arch):
    x, _ = toy_data(seed=1)
    spec = SAETrainConfig(hook=HOOK, architecture=arch, k=4, d_sae=128, lr=2e-3,
                          matryoshka_widths=[16, 32, 64, 128] if arch == "matryoshka" else None)
    module, history = train_toy([spec], x, steps=300)
    losses = [h[spec.sae_id()]["loss/total"] for h in history]
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.7 * first, f"{arch}: loss went from {first:.3f} to {last:.3f}"
    if arch == "matryoshka":
        assert "loss/matryoshka" in history[-1][spec.sae_id()]


def test_several_saes_train_independently_from_one_stream():
    x, _ = toy_data(seed=2)
    specs = [SAETrainConfig(hook=HOOK, architecture="topk", k=4, d_sae=64, lr=2e-3),
             SAETrainConfig(hook=HOOK, architecture="topk", k=8, d_sae=64, lr=2e-3)]
    module, history = train_toy(specs, x, steps=100)
    last = history[-1]
    assert set(last) == {s.sae_id() for s in specs}
    assert last[specs[0].sae_id()]["l0"] == pytest.approx(4)
    assert last[specs[1].sae_id()]["l0"] == pytest.approx(8)
    w0, w1 = (module.saes[s.sae_id()].W_dec for s in specs)
    assert not torch.equal(w0, w1)


def test_jumprelu_threshold_receives_gradient():
    cfg = SAEConfig(d_in=16, d_sae=64, architecture="jumprelu", jumprelu_bandwidth=0.5,
                    jumprelu_init_threshold=0.1)
    sae = build_sae(cfg, seed=0).train()
    x = torch.randn(256, 16)
    out = compute_loss(sae, x, LossSettings(sparsity_coefficient=1.0), torch.zeros(64, dtype=torch.bool))
    out.loss.backward()
    assert sae.threshold.grad is not None
    assert sae.threshold.grad.abs().sum() > 0
    # the L0 term pushes thresholds up: with only the L0 penalty the gradient is negative
    sae.zero_grad()
    out = compute_loss(sae, x, LossSettings(sparsity_coefficient=1.0), torch.zeros(64, dtype=torch.bool))
    out.terms["l0_penalty"].backward()
    assert (sae.threshold.grad <= 0).all() and (sae.threshold.grad < 0).any()


def test_aux_k_trains_dead_latents_only():
    cfg = SAEConfig(d_in=16, d_sae=64, architecture="topk", k=4)
    sae = build_sae(cfg, seed=0).train()
    x = torch.randn(128, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[32:] = True
    out = compute_loss(sae, x, LossSettings(aux_k=8), dead)
    assert out.terms["aux_k"] > 0
    out.terms["aux_k"].backward()
    grad_rows = sae.W_dec.grad.abs().sum(1)
    assert (grad_rows[:32] == 0).all() and (grad_rows[32:] > 0).any()
    none_dead = compute_loss(sae, x, LossSettings(aux_k=8), torch.zeros(64, dtype=torch.bool))
    assert float(none_dead.terms["aux_k"]) == 0.0


def test_k_schedule_anneals_to_target():
    assert k_at(0, 32, 128, 1000) == 128
    assert k_at(500, 32, 128, 1000) == 80
    assert k_at(1000, 32, 128, 1000) == 32
    assert k_at(5, 32, None, 1000) == 32
    x, _ = toy_data(seed=3)
    spec = SAETrainConfig(hook=HOOK, architecture="topk", k=4, k_start=16, k_anneal_tokens=512 * 50,
                          d_sae=64)
    _, history = train_toy([spec], x, steps=80)
    ks = [h[spec.sae_id()]["k"] for h in history]
    assert ks[0] == 16 and ks[-1] == 4 and ks == sorted(ks, reverse=True)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "gated"])
def test_compiled_loss_matches_eager(arch):
    """--compile's torch.compile'd loss gives the eager loss and gradients, for two SAEs of one
    architecture (each a guard of its own) and a coefficient that changes between steps."""
    from saereg.training.losses import compiled_loss

    saes = [build_sae(SAEConfig(d_in=32, d_sae=128, architecture=arch), seed=s) for s in (0, 1)]
    dead = torch.zeros(128, dtype=torch.bool)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    fn = compiled_loss(len(saes))
    for step in range(2):
        for sae in saes:
            settings = LossSettings(sparsity_coefficient=1e-2 * (step + 1), preact_coefficient=1e-3)
            grads = []
            for f in (compute_loss, fn):
                sae.zero_grad(set_to_none=True)
                out = f(sae, x, settings, dead)
                out.loss.backward()
                grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()
                                                  if p.grad is not None}))
            (l_eager, g_eager), (l_comp, g_comp) = grads
            torch.testing.assert_close(l_comp, l_eager, rtol=1e-5, atol=1e-5)
            assert g_comp.keys() == g_eager.keys() and g_eager
            for name in g_eager:
                torch.testing.assert_close(g_comp[name], g_eager[name], rtol=1e-4, atol=1e-5)


def test_preact_loss_pulls_latents_below_their_threshold():
    """The pre-activation loss is sum_i relu(t_i - h_i) ||W_dec,i|| averaged over tokens; its
    gradient reaches the pre-activations of latents under their threshold only, never the
    threshold or the decoder, and lifts the bias of a latent that never fires, which the
    reconstruction and the sparsity terms give no gradient at all."""
    from saereg.training.losses import preact_loss

    cfg = SAEConfig(d_in=16, d_sae=64, architecture="jumprelu", jumprelu_init_threshold=0.3)
    sae = build_sae(cfg, seed=0).train()
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 64)[:, None])  # norms that weigh the gaps
    pre = torch.randn(32, 64, requires_grad=True)
    value = preact_loss(pre, sae.threshold.detach(), sae)
    gap = (sae.threshold.detach() - pre.detach()).clamp_min(0)
    expected = (gap * sae.W_dec.detach().norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(value, expected)
    value.backward()
    below = pre.detach() < sae.threshold.detach()
    assert (pre.grad[~below] == 0).all() and (pre.grad[below] < 0).all()
    assert sae.W_dec.grad is None  # the decoder norms weigh the gaps, detached

    dead = torch.zeros(64, dtype=torch.bool)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    for arch in ("relu", "jumprelu", "gated"):
        sae = build_sae(SAEConfig(d_in=16, d_sae=64, architecture=arch), seed=0).train()
        bias = sae.b_gate if arch == "gated" else sae.b_enc
        with torch.no_grad():
            bias[0] = -100.0  # latent 0 never fires
        grads, untouched = [], []
        for c in (0.0, 1e-3):
            sae.zero_grad(set_to_none=True)
            out = compute_loss(sae, x, LossSettings(sparsity_coefficient=1.0,
                                                    preact_coefficient=c), dead)
            out.loss.backward()
            assert ("preact" in out.terms) == (c > 0), arch
            grads.append(float(bias.grad[0]))
            untouched.append({n: p.grad.clone() for n, p in sae.named_parameters()
                              if n in ("W_dec", "threshold")})
        assert grads[0] == 0.0, arch  # nothing else reaches a latent that never fires
        assert grads[1] < 0, arch  # descent raises its bias toward firing
        for name, grad in untouched[0].items():  # the term moves neither decoder nor threshold
            torch.testing.assert_close(untouched[1][name], grad, msg=f"{arch} {name}")


def test_encoder_biases_learn_in_the_pre_activations_units():
    """relu, jumprelu and gated SAEs put their encoder biases in an Adam group of their own at
    lr x sqrt(d_in) (or bias_lr when given); TopK SAEs keep them with the weights. The
    pre-activation loss is on by default for jumprelu only."""
    d_in = 16
    specs = [SAETrainConfig(hook=HOOK, architecture="relu", d_sae=64),
             SAETrainConfig(hook=HOOK, architecture="gated", d_sae=64, lr=1e-3),
             SAETrainConfig(hook=HOOK, architecture="jumprelu", d_sae=64, bias_lr=0.02),
             SAETrainConfig(hook=HOOK, architecture="topk", d_sae=64, k=4)]
    cfg = TrainConfig(model="toy", saes=specs, tokens=10_000, batch_tokens=100)
    module = SAETrainingModule(cfg.to_dict(), {HOOK: d_in})
    groups = {g["name"]: g for g in module.configure_optimizers()["optimizer"].param_groups}
    # initial_lr: the rate before the warm-up schedule scales it
    relu, gated, jump, topk = (s.sae_id() for s in specs)

    def names(group):
        ids = {id(p) for p in groups[group]["params"]}
        sae = module.saes[group.split("/")[0]]
        return {n for n, p in sae.named_parameters() if id(p) in ids}

    assert names(f"{relu}/biases") == {"b_enc"} and "b_enc" not in names(relu)
    assert groups[f"{relu}/biases"]["initial_lr"] == pytest.approx(specs[0].default_lr(d_in) * 4)
    assert names(f"{gated}/biases") == {"b_gate", "b_mag"}
    assert groups[f"{gated}/biases"]["initial_lr"] == pytest.approx(1e-3 * 4)
    assert groups[f"{jump}/biases"]["initial_lr"] == pytest.approx(0.02)
    assert names(f"{jump}/threshold") == {"threshold"}
    assert f"{topk}/biases" not in groups and "b_enc" in names(topk)
    assert [s.preact_of() for s in specs] == [0.0, 0.0, 1e-3, 0.0]
    assert SAETrainConfig(hook=HOOK, architecture="relu", preact_coefficient=0.01).preact_of() \
        == 0.01
    assert SAETrainConfig(hook=HOOK, architecture="topk", preact_coefficient=0.01).preact_of() \
        == 0.0
    with pytest.raises(ConfigError, match="bias_lr must be a positive finite number; got 0"):
        SAETrainConfig(hook=HOOK, architecture="relu", bias_lr=0)
    with pytest.raises(ConfigError, match="preact_coefficient"):
        SAETrainConfig(hook=HOOK, architecture="relu", preact_coefficient=-1)
