"""Sparse TopK kernels against the dense reference: the gathered decode, the encoder backward
that touches only active latents, and the whole TopK + AuxK loss give the same values and the
same gradients (torch.testing.assert_close) for every parameter, with and without dead latents
(none, fewer than k_aux, some, all; AuxK's products dense over the dead columns or as
embedding bags), and the training module uses them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import saereg.training.kernels as kernels_module
from saereg.registry.sae.modules import SAEConfig, build_sae
from saereg.training.kernels import (ActivePattern, AuxSelection, gathered_pre_acts,
                                     release_workspaces, sparse_decode, topk_aux_encode,
                                     topk_encode, workspace)
from saereg.training.losses import LossSettings, compute_loss


def make(d_in=24, d_sae=96, k=6, seed=0):
    sae = build_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=g)
        sae.b_dec.normal_(0, 0.1, generator=g)
        sae.norm_scale.fill_(1.3)
    x = torch.randn(40, d_in, generator=g)
    return sae, x


def grads(sae, loss):
    sae.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


def test_decode_gather_matches_dense():
    sae, x = make()
    acts_dense = sae.encode(x)
    vals, idx = acts_dense.topk(sae.k, dim=-1)
    dense = sae.decode_normalized(acts_dense)
    torch.testing.assert_close(sparse_decode(idx, vals, sae.W_dec, sae.b_dec), dense)
    w = torch.randn_like(dense)
    g_dense = grads(sae, (sae.decode_normalized(acts_dense.detach()) * w).sum())
    g_sparse = grads(sae, (sparse_decode(idx, vals.detach(), sae.W_dec, sae.b_dec) * w).sum())
    for name in ("W_dec", "b_dec"):
        torch.testing.assert_close(g_sparse[name], g_dense[name])


@pytest.mark.parametrize("centred", [True, False])
def test_encoder_backward_touches_only_active_latents(centred):
    sae, x = make()
    sae.cfg.apply_b_dec_to_input = centred
    w = torch.randn(x.shape[0], sae.k)
    x_n, x_c, pre, pattern, vals = topk_encode(sae, x, sae.k)
    idx = pattern.idx
    g_sparse = grads(sae, (vals * w).sum())
    dense_pre = sae.pre_acts(x)
    g_dense = grads(sae, (dense_pre.gather(-1, idx).relu() * w).sum())
    for name in ("W_enc", "b_enc", "b_dec"):
        if name in g_dense:
            torch.testing.assert_close(g_sparse[name], g_dense[name])
    assert ("b_dec" in g_sparse) == centred == ("b_dec" in g_dense)
    inactive = torch.ones(sae.cfg.d_sae, dtype=torch.bool)
    inactive[idx.unique()] = False
    assert (g_sparse["W_enc"][:, inactive] == 0).all() and (g_sparse["b_enc"][inactive] == 0).all()
    torch.testing.assert_close(gathered_pre_acts(sae, x_n, x_c, pattern, idx, pre),
                               dense_pre.gather(-1, idx))


def test_input_gradient_when_the_input_requires_it():
    """The input's own gradient (G W_enc^T per token) when x is a leaf that needs one."""
    sae, x = make()
    w = torch.randn(x.shape[0], sae.k)
    x_sparse = x.clone().requires_grad_(True)
    _, _, _, pattern, vals = topk_encode(sae, x_sparse, sae.k)
    (vals * w).sum().backward()
    x_dense = x.clone().requires_grad_(True)
    (sae.pre_acts(x_dense).gather(-1, pattern.idx).relu() * w).sum().backward()
    torch.testing.assert_close(x_sparse.grad, x_dense.grad)


def test_active_pattern_product_matches_dense():
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 50, (30, 4), generator=g)
    idx[0] = idx[1]  # a latent active in several tokens, and duplicates within a token
    idx[2, 1] = idx[2, 0]
    vals, dense = torch.randn(30, 4, generator=g), torch.randn(30, 7, generator=g)
    s = torch.zeros(30, 50).index_put_((torch.arange(30)[:, None].expand(30, 4), idx), vals,
                                       accumulate=True)
    pattern = ActivePattern(idx, 50)
    torch.testing.assert_close(pattern.t_matmul(vals, dense), s.t() @ dense)
    torch.testing.assert_close(pattern.t_matmul(2 * vals, dense), 2 * (s.t() @ dense))


def test_workspace_is_reused_and_grows():
    a = workspace(4, 8, torch.float32, torch.device("cpu"))
    b = workspace(2, 8, torch.float32, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr() and b.shape == (2, 8)
    c = workspace(16, 8, torch.float32, torch.device("cpu"))
    assert c.shape == (16, 8)
    assert workspace(4, 8, torch.float32, torch.device("cpu")).data_ptr() == c.data_ptr()
    assert workspace(4, 8, torch.float64, torch.device("cpu")).data_ptr() != c.data_ptr()
    release_workspaces()
    assert not getattr(kernels_module._workspaces, "bufs", None)


def test_saes_of_different_widths_in_one_step_match_the_dense_reference():
    """Two SAEs share the CPU workspace within one step; each one's loss and gradients are
    still its own."""
    (big, x), (small, _) = make(d_sae=96), make(d_sae=48, seed=1)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[:30] = True
    refs = [compute_loss(m, x, LossSettings(aux_k=8, sparse_topk=False), d)
            for m, d in ((big, dead), (small, dead[:48]))]
    g_refs = [grads(m, r.loss) for m, r in zip((big, small), refs)]
    fast = [compute_loss(m, x, LossSettings(aux_k=8), d) for m, d in ((big, dead), (small, dead[:48]))]
    for m in (big, small):
        m.zero_grad(set_to_none=True)
    (fast[0].loss + fast[1].loss).backward()
    for m, r, f, g_ref in zip((big, small), refs, fast, g_refs):
        torch.testing.assert_close(f.loss, r.loss)
        for name, p in m.named_parameters():
            torch.testing.assert_close(p.grad, g_ref[name], rtol=1e-4, atol=1e-5)


@pytest.fixture(params=["dense", "bags"])
def aux_mode(request, monkeypatch):
    """AuxK's products over the dead latents either way: dense [B, n_dead] products, or
    embedding bags over the sorted selection (the choice the kernels make by density)."""
    monkeypatch.setattr(AuxSelection, "DENSE_ABOVE", 0.0 if request.param == "dense" else 2.0)
    return request.param


# 0 dead; fewer dead than k_aux (k_aux = n_dead); some; every latent dead
@pytest.mark.parametrize("n_dead", [0, 5, 60, 96])
@pytest.mark.parametrize("centred", [True, False])
def test_topk_loss_and_grads_match_dense_reference(n_dead, centred, aux_mode):
    sae, x = make(seed=n_dead)
    sae.cfg.apply_b_dec_to_input = centred
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    dead[torch.randperm(sae.cfg.d_sae, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
    ref = compute_loss(sae, x, LossSettings(aux_k=12, sparse_topk=False), dead)
    g_ref = grads(sae, ref.loss)
    fast = compute_loss(sae, x, LossSettings(aux_k=12, sparse_topk=True), dead)
    g_fast = grads(sae, fast.loss)
    torch.testing.assert_close(fast.loss, ref.loss)
    torch.testing.assert_close(fast.x_hat, ref.x_hat)
    torch.testing.assert_close(fast.dense_acts(), ref.acts)
    torch.testing.assert_close(fast.l0(), ref.l0())
    for key in ("mse", "aux_k"):
        torch.testing.assert_close(fast.terms[key], ref.terms[key])
    assert (float(ref.terms["aux_k"].detach()) > 0) == (n_dead > 0)
    assert set(g_fast) == set(g_ref)
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-4, atol=1e-5)
    if 0 < n_dead < sae.cfg.d_sae:  # AuxK's gradient reaches the dead latents only
        alive = ~dead
        g_mse = grads(sae, compute_loss(sae, x, LossSettings(sparse_topk=False), dead).terms["mse"])
        for name, cols in (("W_enc", (slice(None), alive)), ("W_dec", (alive,)),
                           ("b_enc", (alive,))):
            torch.testing.assert_close(g_fast[name][cols], g_mse[name][cols], rtol=1e-4,
                                       atol=1e-5)
        assert not torch.allclose(g_fast["W_dec"][dead], g_mse["W_dec"][dead])


def test_aux_selection_covers_the_top_dead_pre_activations(aux_mode):
    """topk_aux_encode picks, per token, the k_aux largest pre-activations among the dead
    latents (indices into the dead set), and its two outputs carry the encoder gradient of
    both terms, the input's own included."""
    sae, x = make()
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    dead[::3] = True
    x_sparse = x.clone().requires_grad_(True)
    x_n, pattern, vals, sel, a = topk_aux_encode(sae, x_sparse, sae.k, dead, 7)
    pre = sae.pre_acts(x)
    assert torch.equal(sel.dead, dead.nonzero().squeeze(1)) and sel.local.shape == (40, 7)
    expect = pre.masked_fill(~dead, -torch.inf).topk(7, dim=-1).values
    torch.testing.assert_close(a.sort(-1, descending=True).values, expect.relu())
    w, w_aux = torch.randn(40, sae.k), torch.randn(40, 7)
    g_fast = grads(sae, (vals * w).sum() + (a * w_aux).sum())
    x_dense = x.clone().requires_grad_(True)
    pre_d = sae.pre_acts(x_dense)
    loss = ((pre_d.gather(-1, pattern.idx).relu() * w).sum()
            + (pre_d.gather(-1, sel.global_idx()).relu() * w_aux).sum())
    g_ref = grads(sae, loss)
    for name in ("W_enc", "b_enc", "b_dec"):
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_sparse.grad, x_dense.grad, rtol=1e-4, atol=1e-5)


def test_aux_products_pick_dense_by_density():
    dead = torch.arange(0, 1000, 2)
    assert AuxSelection(dead, torch.zeros(4, 100, dtype=torch.long)).dense  # 100 of 500
    assert not AuxSelection(dead, torch.zeros(4, 5, dtype=torch.long)).dense  # 5 of 500


def test_sparse_path_under_bf16_autocast():
    """Under autocast the product and top-k run in bfloat16 (the workspace has that dtype); the
    loss and gradients are float32, agree with the dense path under the same autocast and stay
    within bfloat16 rounding of the float32 loss."""
    sae, x = make(d_in=32, d_sae=256, k=8)
    dead = torch.zeros(256, dtype=torch.bool)
    dead[:40] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, pre, _, vals = topk_encode(sae, x, sae.k)
        assert pre.dtype == torch.bfloat16 and vals.dtype == torch.float32
        fast = compute_loss(sae, x, LossSettings(aux_k=12), dead)
        ref = compute_loss(sae, x, LossSettings(aux_k=12, sparse_topk=False), dead)
    g_fast, g_ref = grads(sae, fast.loss), grads(sae, ref.loss)
    assert fast.loss.dtype == torch.float32
    torch.testing.assert_close(fast.loss, ref.loss, rtol=2e-2, atol=1e-3)
    for name in g_ref:  # bf16 rounding can swap near-tied latents, so compare whole gradients
        assert g_fast[name].dtype == torch.float32
        rel = float((g_fast[name] - g_ref[name]).norm() / g_ref[name].norm())
        assert rel < 0.08, (name, rel)
    full = compute_loss(sae, x, LossSettings(aux_k=12), dead)
    torch.testing.assert_close(fast.loss, full.loss, rtol=2e-2, atol=1e-3)


def test_training_module_uses_the_sparse_path(monkeypatch):
    import saereg.training.kernels as kernels
    from saereg.training.config import SAETrainConfig, TrainConfig
    from saereg.training.module import SAETrainingModule

    calls = []
    real = kernels.sparse_decode
    monkeypatch.setattr(kernels, "sparse_decode", lambda *a: calls.append(1) or real(*a))
    cfg = TrainConfig(model="toy", saes=[SAETrainConfig(hook="h", k=4, expansion=2)],
                      tokens=64, batch_tokens=32, buffer_tokens=32)
    module = SAETrainingModule(cfg.to_dict(), {"h": 16})
    module.initialize_from({"h": torch.randn(64, 16)})
    module.log = lambda *a, **k: None
    module.training_step({"h": torch.randn(32, 16)}, 0)
    assert calls
    assert kernels_module._workspaces.bufs  # the pre-activations' buffer, freed when training ends
    module.on_train_end()
    assert not getattr(kernels_module._workspaces, "bufs", None)
    # the sparse firing statistics equal the dense ones
    from saereg.training.module import LatentStats

    sae = module.saes["h-topk-x2-k4"]
    out = compute_loss(sae, torch.randn(32, 16), LossSettings(), torch.zeros(32, dtype=torch.bool))
    assert out.acts is None and out.idx is not None  # the sparse path's output
    dense = SimpleNamespace(acts=out.dense_acts(), idx=None, vals=None)
    a, b = LatentStats(32), LatentStats(32)
    sparse_counts, dense_counts = a.fire_counts(out), b.fire_counts(dense)
    assert torch.equal(sparse_counts, dense_counts) and int(sparse_counts.sum()) > 0
    a.record(sparse_counts, 32, True)
    b.record(dense_counts, 32, True)
    for name in ("tokens_since_fired", "fire_count", "count_tokens"):
        assert torch.equal(getattr(a, name), getattr(b, name))
