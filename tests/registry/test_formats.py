"""Foreign SAE layouts, built here from their documented layouts with random weights:
`saereg sae import PATH --format auto --name NAME` detects and converts SAELens folders (made by
sae_lens itself: standard, topk, jumprelu, gated), sparsify folders, Gemma Scope params.npz and
dictionary_learning ae.pt + config.json (AutoEncoder, AutoEncoderTopK, BatchTopKSAE); each
imported version encodes and decodes exactly as the original formula does. `saereg sae convert`
writes the sparsify and SAELens layouts, which read back to the same outputs. Bad files give one
clear error and register nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from catalog_helpers import table_counts
from click.testing import CliRunner
from safetensors.torch import save_file

from saereg.commands.main import cli
from saereg.registry.api import load_sae
from saereg.registry.sae.formats import detect_format, read_foreign

D_IN, D_SAE, K = 16, 48, 5
G = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


@pytest.fixture
def home(mlflow_store, monkeypatch):
    monkeypatch.delenv("SAEREG_DATABASE_URL", raising=False)
    yield
    from saereg.registry.catalog import db

    db.dispose_all()


def sh(*args: str):
    return CliRunner().invoke(cli, list(args))


def imported(path, name: str, *extra: str):
    result = sh("sae", "import", str(path), "--format", "auto", "--name", name,
                "--model", "m", "--hook", "h", *extra)
    assert result.exit_code == 0, result.output
    assert f"as {name}@1" in result.output
    return load_sae(f"{name}@1")


def topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    acts = torch.relu(pre)
    values, idx = acts.topk(k, dim=-1)
    return torch.zeros_like(acts).scatter(-1, idx, values)


def check(sae, encode, decode, x=None) -> None:
    x = rand(64, D_IN) if x is None else x
    with torch.no_grad():
        want = encode(x)
        assert torch.allclose(sae.encode(x), want, atol=1e-5)
        assert (want > 0).any()
        assert torch.allclose(sae.decode(want), decode(want), atol=1e-5)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_saelens_folders_made_by_sae_lens(home, tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    classes = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
               "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": K}),
               "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
               "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig, {})}
    cls, cfg_cls, extra = classes[arch]
    theirs = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **extra))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(rand(*p.shape) * 0.3 if name != "threshold" else rand(*p.shape).abs() * 0.2)
    theirs.save_model(tmp_path / "lens")
    assert detect_format(tmp_path / "lens") == "saelens"
    ours = imported(tmp_path / "lens", f"lens-{arch}")
    check(ours, theirs.encode, theirs.decode)


def test_sparsify_folder_and_export_round_trip(home, tmp_path):
    enc_w, enc_b, w_dec, b_dec = rand(D_SAE, D_IN), rand(D_SAE) * 0.1, rand(D_SAE, D_IN), rand(D_IN)
    src = tmp_path / "sparsify"
    src.mkdir()
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": w_dec, "b_dec": b_dec},
              str(src / "sae.safetensors"))
    (src / "cfg.json").write_text(json.dumps({
        "d_in": D_IN, "num_latents": D_SAE, "k": K, "expansion_factor": 3,
        "normalize_decoder": True, "multi_topk": False, "skip_connection": False}))

    def encode(x):  # sparsify: ReLU(encoder(x - b_dec)), then the k largest
        return topk((x - b_dec) @ enc_w.T + enc_b, K)

    def decode(f):
        return f @ w_dec + b_dec

    ours = imported(src, "sp")
    assert ours.cfg.architecture == "topk" and ours.cfg.k == K
    check(ours, encode, decode)
    result = sh("sae", "convert", "sp@1", str(tmp_path / "out"), "--to", "sparsify")
    assert result.exit_code == 0, result.output
    back = read_foreign(tmp_path / "out", "sparsify")
    check(back, encode, decode)
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(tmp_path / "out" / "sae.safetensors"))["encoder.weight"],
                       enc_w)
    result = sh("sae", "convert", "sp@1", str(tmp_path / "lens"), "--to", "saelens")
    assert result.exit_code == 0, result.output
    check(load_sae(str(tmp_path / "lens")), encode, decode)


def test_gemma_scope_params_npz(home, tmp_path):
    w_enc, w_dec = rand(D_IN, D_SAE).numpy(), rand(D_SAE, D_IN).numpy()
    b_enc, b_dec = (rand(D_SAE) * 0.1).numpy(), rand(D_IN).numpy()
    threshold = (rand(D_SAE).abs() * 0.5).numpy()
    folder = tmp_path / "layer_6" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", W_enc=w_enc, W_dec=w_dec, b_enc=b_enc, b_dec=b_dec,
             threshold=threshold)

    def encode(x):  # Gemma Scope JumpReLU: no b_dec subtraction on the input
        pre = x.numpy() @ w_enc + b_enc
        return torch.from_numpy((pre * (pre > threshold)).astype(np.float32))

    def decode(f):
        return torch.from_numpy(f.numpy() @ w_dec + b_dec)

    ours = imported(folder / "params.npz", "gs")
    assert ours.cfg.architecture == "jumprelu" and not ours.cfg.apply_b_dec_to_input
    check(ours, encode, decode)
    with pytest.raises(Exception, match="cannot export to 'gemmascope'"):
        from saereg.registry.api import convert_sae as convert
        convert("gs@1", tmp_path / "x", to="gemmascope")
    result = sh("sae", "convert", "gs@1", str(tmp_path / "sp"), "--to", "sparsify")
    assert result.exit_code == 2 and "topk" in result.output


@pytest.mark.parametrize("dict_class", ["AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE"])
def test_dictionary_learning_ae_pt(home, tmp_path, dict_class):
    enc_w, enc_b = rand(D_SAE, D_IN), rand(D_SAE) * 0.1
    dec_w, bias = rand(D_IN, D_SAE), rand(D_IN)
    state = {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w}
    if dict_class == "AutoEncoder":
        state["bias"] = bias
    else:
        state["b_dec"] = bias
        state["k"] = torch.tensor(K)
    threshold = 0.8
    if dict_class == "BatchTopKSAE":
        state["threshold"] = torch.tensor(threshold)
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    torch.save(state, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {
        "dict_class": dict_class, "activation_dim": D_IN, "dict_size": D_SAE, "k": K,
        "lm_name": "EleutherAI/pythia-70m-deduped", "layer": 3,
        "submodule_name": "gpt_neox.layers.3"}, "buffer": {"d_submodule": D_IN}}))

    def encode(x):
        post = torch.relu((x - bias) @ enc_w.T + enc_b)
        if dict_class == "AutoEncoderTopK":
            return topk(post, K)
        if dict_class == "BatchTopKSAE":
            return post * (post > threshold)
        return post

    def decode(f):
        return f @ dec_w.T + bias

    result = sh("sae", "import", str(folder), "--name", "dl")
    assert result.exit_code == 0, result.output
    ours = load_sae("dl@1")
    from saereg.registry.api import get_version
    v = get_version("dl@1")
    assert (v.model, v.hook) == ("EleutherAI/pythia-70m-deduped", "gpt_neox.layers.3")
    check(ours, encode, decode)


def test_bad_foreign_input_registers_nothing(home, tmp_path):
    from saereg.registry.catalog.writes import Catalog
    Catalog().list()
    counts = table_counts()
    (tmp_path / "empty").mkdir()
    result = sh("sae", "import", str(tmp_path / "empty"), "--name", "x")
    assert result.exit_code == 1 and "not a known SAE layout" in result.output
    bad = tmp_path / "pickled"
    bad.mkdir()
    torch.save({"encoder.weight": object()}, bad / "ae.pt")  # needs unpickling: refused
    result = sh("sae", "import", str(bad), "--name", "x")
    assert result.exit_code == 1 and "weights-only" in result.output
    sp = tmp_path / "sp"
    sp.mkdir()
    save_file({"encoder.weight": rand(D_SAE, D_IN), "encoder.bias": rand(D_SAE),
               "W_dec": rand(D_SAE, D_IN + 1), "b_dec": rand(D_IN)}, str(sp / "sae.safetensors"))
    (sp / "cfg.json").write_text(json.dumps({"d_in": D_IN, "num_latents": D_SAE, "k": K}))
    result = sh("sae", "import", str(sp), "--name", "x", "--model", "m", "--hook", "h")
    assert result.exit_code == 1 and "W_dec has shape (48, 17)" in result.output
    result = sh("sae", "import", str(sp), "--name", "x", "--format", "nonsense")
    assert result.exit_code == 2
    assert table_counts() == counts
