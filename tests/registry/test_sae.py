"""SAE modules for every architecture: shapes, sparsity rules (TopK exactly k, JumpReLU below
threshold, BatchTopK k*batch in training and threshold at inference), bit-exact save/load in
the SAELens layout, normalisation folding, inconsistent folders refused, and SAELens itself
loading every export and encoding the same."""

from __future__ import annotations

import json

import pytest
import torch

from saereg.registry.errors import ConfigError, SAEFormatError
from saereg.registry.sae.folder import load_log_sparsity, load_sae, save_sae
from saereg.registry.sae.modules import ARCHITECTURES, K_ARCHITECTURES, SAEConfig, build_sae

D_IN, D_SAE, K = 24, 96, 6


def make(arch: str, seed: int = 0):
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch,
                    k=K if arch in K_ARCHITECTURES else None,
                    metadata={"model_name": "tiny", "hook_name": "model.layers.1"})
    sae = build_sae(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name.startswith("b_") or name == "r_mag":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.5)
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.3)
        sae.norm_scale.fill_(0.25)
    return sae.eval()


def inputs(n: int = 32, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shapes(arch):
    sae = make(arch)
    x = inputs()
    acts = sae.encode(x)
    assert acts.shape == (32, D_SAE)
    assert sae.decode(acts).shape == (32, D_IN)
    assert sae(x).shape == x.shape
    assert sae.W_enc.shape == (D_IN, D_SAE) and sae.W_dec.shape == (D_SAE, D_IN)
    assert (acts >= 0).all()


def test_topk_exactly_k_active():
    sae = make("topk")
    acts = sae.encode(inputs(64))
    assert ((acts > 0).sum(-1) == K).all()


def test_jumprelu_zero_below_threshold():
    sae = make("jumprelu")
    x = inputs()
    pre = sae.pre_acts(x)
    acts = sae.encode(x)
    below = pre <= sae.threshold
    assert below.any() and (~below).any()
    assert (acts[below] == 0).all()
    torch.testing.assert_close(acts[~below], pre[~below])


def test_batchtopk_training_keeps_k_times_batch_and_inference_uses_threshold():
    sae = make("batchtopk").train()
    x = inputs(40)
    acts = sae.encode(x)
    assert int((acts > 0).sum()) == K * 40
    per_token = (acts > 0).sum(-1)
    assert per_token.max() != per_token.min(), "batch-level selection varies per token"
    sae.eval()
    pre = sae.pre_acts(x)
    acts = sae.encode(x)
    expected = torch.relu(pre) * (pre > 0.3)
    torch.testing.assert_close(acts, expected)


def test_batchtopk_threshold_is_ema_of_smallest_kept_activation():
    sae = make("batchtopk").train()
    sae.threshold.fill_(-1.0)
    acts = sae.encode(inputs(40))
    sae.update_threshold(acts)
    first = float(acts[acts > 0].min())
    assert float(sae.threshold) == pytest.approx(first)
    sae.update_threshold(acts * 0 + 2.0, momentum=0.5)
    assert float(sae.threshold) == pytest.approx(0.5 * first + 0.5 * 2.0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fold_normalization_keeps_outputs(arch):
    sae = make(arch)
    x = inputs()
    before_acts, before_out = sae.encode(x), sae(x)
    sae.fold_normalization()
    assert float(sae.norm_scale) == 1.0
    torch.testing.assert_close(sae.encode(x), before_acts, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae(x), before_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fold_decoder_norms_keeps_outputs_and_firing(arch):
    """Rows of norms 0.3-3 become unit rows; each latent fires where it did, its activation
    scaled by its row's old norm, and the reconstruction is unchanged. The TopK family picks
    latents by rank, which such a scaling would change: refused, with nothing changed."""
    sae = make(arch)
    norms = torch.linspace(0.3, 3.0, D_SAE)
    with torch.no_grad():
        sae.W_dec.mul_(norms.unsqueeze(1) / sae.W_dec.norm(dim=1, keepdim=True))
    x = inputs()
    before_acts, before_out = sae.encode(x), sae(x)
    if arch in K_ARCHITECTURES:
        state = {k: v.clone() for k, v in sae.state_dict().items()}
        with pytest.raises(TypeError, match="by rank"):
            sae.fold_decoder_norms()
        for k, v in sae.state_dict().items():
            assert torch.equal(v, state[k]), k
        return
    sae.fold_decoder_norms()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    acts = sae.encode(x)
    assert torch.equal(acts > 0, before_acts > 0)
    assert (before_acts > 0).any() and not (before_acts > 0).all()
    torch.testing.assert_close(acts, before_acts * norms, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae(x), before_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_bit_exact(arch, tmp_path):
    sae = make(arch)
    sae.fold_normalization()
    sparsity = torch.linspace(-5, -1, D_SAE)
    save_sae(sae, tmp_path / "sae", log_sparsity=sparsity)
    loaded = load_sae(tmp_path / "sae")
    exported = sae.export_state_dict()
    reloaded = loaded.export_state_dict()
    assert exported.keys() == reloaded.keys()
    for name, t in exported.items():
        assert torch.equal(t, reloaded[name]), name
    x = inputs()
    assert torch.equal(loaded(x), sae(x))
    assert torch.equal(load_log_sparsity(tmp_path / "sae"), sparsity)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "model.layers.1"
    assert cfg["metadata"]["training_architecture"] == arch
    assert cfg["normalize_activations"] == "none"
    expected_arch = {"relu": "standard", "batchtopk": "jumprelu", "matryoshka": "jumprelu"}
    assert cfg["architecture"] == expected_arch.get(arch, arch)


def test_save_folds_normalization_without_touching_the_module(tmp_path):
    sae = make("topk")
    x = inputs()
    save_sae(sae, tmp_path / "sae")
    assert float(sae.norm_scale) == 0.25
    torch.testing.assert_close(load_sae(tmp_path / "sae")(x), sae(x), rtol=1e-4, atol=1e-4)


def test_folder_disagreeing_with_tensors_is_refused(tmp_path):
    save_sae(make("relu"), tmp_path / "sae")
    cfg_path = tmp_path / "sae" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["d_sae"] = D_SAE * 2
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="d_sae=192"):
        load_sae(tmp_path / "sae")


def test_save_never_leaves_partial_folder(tmp_path):
    sae = make("relu")
    save_sae(sae, tmp_path / "sae")
    with pytest.raises(FileExistsError):
        save_sae(sae, tmp_path / "sae")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


@pytest.mark.parametrize("bad", [dict(k=D_SAE), dict(k=0), dict(d_sae=-1), dict(architecture="nope")])
def test_bad_configs(bad):
    args = dict(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=K) | bad
    with pytest.raises(ConfigError):
        SAEConfig(**args)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sae_lens_loads_every_export(arch, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = make(arch)
    save_sae(sae, tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    x = inputs()
    torch.testing.assert_close(theirs.encode(x), sae.encode(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(theirs.decode(theirs.encode(x)), sae(x), rtol=1e-4, atol=1e-4)
