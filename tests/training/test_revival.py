"""Split revival (saereg.training.revival): a latent that stands between two features is split,
and a latent that carries almost nothing takes the second one; latents that each hold one
feature are left alone; the move rewrites exactly the two latents and their Adam moments; the
rounds' schedule follows the config; a TopK job at its defaults runs rounds that move latents."""

from __future__ import annotations

import pytest
import torch

from saereg.registry.errors import ConfigError
from saereg.registry.sae.modules import SAEConfig, build_sae
from saereg.training.config import SAETrainConfig
from saereg.training.revival import apply_splits, plan_splits

D, N = 32, 12


def features(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(N, D, generator=g)
    return f / f.norm(dim=1, keepdim=True)


def samples(f: torch.Tensor, n: int = 6000, seed: int = 1) -> torch.Tensor:
    """One feature per sample (uniform over the features), magnitude 1-3."""
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(0, len(f), (n,), generator=g)
    mags = 1 + 2 * torch.rand(n, generator=g)
    return mags[:, None] * f[which] + 0.01 * torch.randn(n, D, generator=g)


def sae_with_rows(rows: torch.Tensor, arch: str = "topk"):
    sae = build_sae(SAEConfig(d_in=D, d_sae=len(rows), architecture=arch,
                              k=1 if arch == "topk" else None), seed=0)
    with torch.no_grad():
        rows = rows / rows.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(rows)
        sae.W_enc.copy_(rows.T)
    return sae


def test_a_merged_latent_is_split_onto_the_unused_latent():
    """Latent 0 sits at the mean of features 0 and 1 (it fires on both); latent 11 points
    where no feature is. One round moves latent 11 onto one of the two features and leaves
    latent 0 the other."""
    f = features()
    rows = torch.cat([(f[0] + f[1])[None], f[2:], -f[2:3] - f[3:4]])  # last: nowhere
    assert len(rows) == N
    sae = sae_with_rows(rows)
    moved, split, keep, take = plan_splits(sae, samples(f), max_moves=3)
    assert moved.tolist() == [N - 1] and split.tolist() == [0]
    cos = torch.stack([keep[0], take[0]]) @ f[:2].T
    best = cos.max(dim=1)
    assert sorted(best.indices.tolist()) == [0, 1]  # one feature each
    assert (best.values > 0.99).all(), cos


def test_latents_that_each_hold_one_feature_are_left_alone():
    f = features()
    sae = sae_with_rows(f)
    moved, split, keep, take = plan_splits(sae, samples(f), max_moves=5)
    assert len(moved) == 0 and len(split) == 0 and keep.shape == (0, D)


def test_apply_splits_rewrites_only_the_two_latents_and_their_moments():
    f = features()
    sae = sae_with_rows(torch.cat([(f[0] + f[1])[None], f[2:], f[3:4] * 0 + f[4:5]]), "jumprelu")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = samples(f)
    sae(x).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        sae.threshold.copy_(torch.arange(N, dtype=torch.float32) / 10)
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    enc_norm = float(sae.W_enc[:, 0].detach().norm())
    moved, split = torch.tensor([N - 1]), torch.tensor([0])
    apply_splits(sae, moved, split, f[0:1], f[1:2], opt)
    torch.testing.assert_close(sae.W_dec[0], f[0])
    torch.testing.assert_close(sae.W_dec[N - 1], f[1])
    torch.testing.assert_close(sae.W_enc[:, N - 1], f[1] * enc_norm)
    torch.testing.assert_close(sae.W_enc[:, 0], f[0] * enc_norm)
    assert float(sae.threshold[N - 1].detach()) == pytest.approx(0.0)  # the split latent's threshold
    others = list(range(1, N - 1))
    torch.testing.assert_close(sae.W_dec[others], before["W_dec"][others])
    torch.testing.assert_close(sae.W_enc[:, others], before["W_enc"][:, others])
    state = opt.state[sae.W_enc]
    assert state["exp_avg"][:, [0, N - 1]].abs().sum() == 0
    assert state["exp_avg_sq"][:, others].abs().sum() > 0
    assert opt.state[sae.W_dec]["exp_avg"][[0, N - 1]].abs().sum() == 0
    assert opt.state[sae.b_enc]["exp_avg_sq"][[0, N - 1]].abs().sum() == 0
    assert opt.state[sae.b_enc]["exp_avg_sq"][others].abs().sum() > 0


def test_revival_schedule_follows_the_config():
    topk = SAETrainConfig(hook="h", architecture="topk", k=3)
    # a twentieth of 1M tokens is ~24 steps of 2048; rounds until 80% of 488 steps
    steps = topk.revival_steps(488, 2048, 1_000_000)
    assert steps[0] == 24 and steps[-1] < 0.8 * 488 and len(steps) == 16
    assert SAETrainConfig(hook="h", architecture="relu").revival_steps(488, 2048, 10**6) == []
    # rounds are at least a sample (32768 tokens) apart: 12 steps of 512 have none
    assert topk.revival_steps(12, 512, 6144) == []
    assert topk.revival_steps(200, 512, 102_400) == [64, 128]
    relu = SAETrainConfig(hook="h", architecture="relu", revive_until=1.0, revive_every=20480)
    # the refit (the last tenth) has none
    assert relu.revival_steps(100, 1024, 102_400)[-1] < 90
    off = SAETrainConfig(hook="h", architecture="topk", k=3, revive_until=0)
    assert off.revival_steps(488, 2048, 1_000_000) == []
    with pytest.raises(ConfigError, match="revive_until is a share"):
        SAETrainConfig(hook="h", architecture="topk", k=3, revive_until=1.5)
    with pytest.raises(ConfigError, match="revive_share"):
        SAETrainConfig(hook="h", architecture="topk", k=3, revive_share=0)
