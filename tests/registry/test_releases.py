"""Releases by name: SAEs that SAELens's release table names, pulled through the real
huggingface_hub client from the project's local hub-compatible server.

The tests write small repos in every layout the project converts (random weights of the
right names, shapes and orientations, laid out as the real releases are: Gemma Scope's
``layer_N/width_16k/average_l0_K/params.npz``, Llama Scope's ``checkpoints/final.safetensors``,
Qwen Scope's ``layerN.sae.pt``, ...) and a release table with the schema of sae-lens's
``pretrained_saes.yaml``. They prove, on SQLite and on PostgreSQL, that:

- ``saereg sync pull --release R --sae-id ID`` (and ``load_sae("saelens://R/ID")``) pulls each
  SAE by name, and the registered SAE encodes like a reference encoder written here from the
  layout's own definition on the raw tensors;
- the catalog records the provenance (release, id, layout, repo, path, commit, Neuronpedia id)
  in tags, source_uri, cfg.json metadata and the publications table;
- a second pull adds nothing and downloads no file (the server sees no file request), nor does
  a pull through a second release naming the same folder; a ``saelens://`` load while the Hub
  fails is served by the copy pulled before;
- every dictionary_learning class (AutoEncoder, AutoEncoderTopK, MatryoshkaBatchTopKSAE,
  JumpReluAutoEncoder, GatedAutoEncoder) converts to a module that encodes as it defines;
- a conversion that encodes otherwise than its layout's definition is refused;
- a release whose layout is not convertible (a transcoder) gives one clear error naming the
  layout and records nothing; a hostile path in the table is refused before any request;
- ``saereg releases`` lists the installed sae-lens table (Gemma Scope releases among them),
  and says how to install sae-lens when it is missing.
"""

from __future__ import annotations

import io
import json
import math
import sys

import numpy as np
import pytest
import torch
import yaml
from catalog_helpers import catalog_state, error_line, table_counts
from click.testing import CliRunner
from hubserver import serve_hub_online

from saereg.commands.main import cli
from saereg.registry.api import load_sae

D_IN, D_SAE, K = 16, 64, 8
SECRET = "hf_TESTSECRETreleases0123456789"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    yield from serve_hub_online(monkeypatch, tmp_path / "hf-home", SECRET)


def _st(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


def _pt(tensors: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def _npz(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _js(obj) -> bytes:
    return json.dumps(obj).encode()


def relu(a):
    return np.maximum(a, 0)


def jump(pre, thr):
    return pre * (pre > thr)


def topk(pre, k):
    out = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=-1)[:, :k]
    np.put_along_axis(out, idx, relu(np.take_along_axis(pre, idx, -1)), -1)
    return out


def build_repos(srv) -> tuple[dict, dict]:
    """Write one small repo per supported layout (and a transcoder) to the server. Returns the
    release table (sae-lens's schema) and, per release, (sae id, reference encoder)."""
    g = np.random.default_rng(0)

    def r(*shape, scale=0.3):
        return (g.standard_normal(shape) * scale).astype(np.float32)

    t = torch.from_numpy
    table, refs = {}, {}

    def add(release, repo, conversion, sae, files, ref, model="tiny-lm"):
        srv.state.put_files(repo, files)
        table[release] = {"repo_id": repo, "model": model, "conversion_func": conversion,
                          "saes": [sae]}
        refs[release] = (sae["id"], ref)

    # SAELens folder, pre-6 config (hook_point), with its sparsity file
    w_enc, w_dec, b_enc, b_dec = r(D_IN, D_SAE), r(D_SAE, D_IN), r(D_SAE), r(D_IN)
    add("tiny-res-jb", "jbloom/tiny-res", None,
        {"id": "blocks.0.hook_resid_pre", "path": "v5_layer_0", "l0": 12.5,
         "neuronpedia": "tiny/0-res-jb"},
        {"v5_layer_0/cfg.json": _js({"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
                                     "model_name": "tiny-lm",
                                     "hook_point": "blocks.0.hook_resid_pre",
                                     "apply_b_dec_to_input": True}),
         "v5_layer_0/sae_weights.safetensors": _st({"W_enc": t(w_enc), "W_dec": t(w_dec),
                                                    "b_enc": t(b_enc), "b_dec": t(b_dec)}),
         "v5_layer_0/sparsity.safetensors": _st({"sparsity": t(r(D_SAE) - 3)})},
        lambda x, a=(w_enc, b_enc, b_dec): relu((x - a[2]) @ a[0] + a[1]))

    # Gemma Scope: params.npz, JumpReLU on x W_enc + b_enc
    w_enc, w_dec, b_enc, b_dec, thr = r(D_IN, D_SAE), r(D_SAE, D_IN), r(D_SAE), r(D_IN), \
        np.abs(r(D_SAE))
    add("gemma-scope-tiny-pt-res", "google/gemma-scope-tiny-pt-res", "gemma_2",
        {"id": "layer_3/width_16k/average_l0_7", "path": "layer_3/width_16k/average_l0_7",
         "l0": 7, "neuronpedia": "tiny/3-gemmascope-res-16k"},
        {"layer_3/width_16k/average_l0_7/params.npz": _npz(
            {"W_enc": w_enc, "W_dec": w_dec, "b_enc": b_enc, "b_dec": b_dec, "threshold": thr})},
        lambda x, a=(w_enc, b_enc, thr): jump(x @ a[0] + a[1], a[2]))

    # Gemma Scope 2: params.safetensors with lower-case names, config.json
    w_enc, w_dec, b_enc, b_dec, thr = r(D_IN, D_SAE), r(D_SAE, D_IN), r(D_SAE), r(D_IN), \
        np.abs(r(D_SAE))
    add("gemma-scope-2-tiny-pt-res", "google/gemma-scope-2-tiny-pt", "gemma_3",
        {"id": "layer_5_width_16k_l0_small", "path": "resid_post/layer_5_width_16k_l0_small",
         "l0": 20},
        {"resid_post/layer_5_width_16k_l0_small/params.safetensors": _st(
            {"w_enc": t(w_enc), "w_dec": t(w_dec), "b_enc": t(b_enc), "b_dec": t(b_dec),
             "threshold": t(thr)}),
         "resid_post/layer_5_width_16k_l0_small/config.json": _js(
             {"architecture": "jump_relu", "model_name": "gemma-v3-tiny-pt",
              "hf_hook_point_in": "model.layers.5.output"})},
        lambda x, a=(w_enc, b_enc, thr): jump(x @ a[0] + a[1], a[2]))

    # Llama Scope: hyperparams.json + checkpoints/final.safetensors (nn.Linear orientation,
    # bfloat16 as the release ships it)
    enc_w, enc_b, dec_w, dec_b = (t(a).bfloat16().float().numpy() for a in (
        r(D_SAE, D_IN), r(D_SAE), r(D_IN, D_SAE), r(D_IN)))
    avg, jrt = 7.0, 0.2
    s = math.sqrt(D_IN) / avg
    add("llama_scope_tiny_lxr_4x", "fnlp/TinyLlama-Base-LXR-4x", "llama_scope",
        {"id": "l7r_4x", "path": "TinyLlama-Base-L7R-4x", "l0": 30.0,
         "neuronpedia": "tinyllama/7-llamascope-res-64", "norm_scaling_factor": s},
        {"TinyLlama-Base-L7R-4x/hyperparams.json": _js(
            {"d_model": D_IN, "d_sae": D_SAE, "jump_relu_threshold": jrt,
             "dataset_average_activation_norm": {"in": avg, "out": avg},
             "hook_point_in": "blocks.7.hook_resid_post"}),
         "TinyLlama-Base-L7R-4x/checkpoints/final.safetensors": _st(
             {"encoder.weight": t(enc_w).bfloat16(), "encoder.bias": t(enc_b).bfloat16(),
              "decoder.weight": t(dec_w).bfloat16(), "decoder.bias": t(dec_b).bfloat16()})},
        lambda x, a=(enc_w, enc_b): jump((x * s) @ a[0].T + a[1], jrt * s))

    # Llama Scope R1: config.json + sae_weights.safetensors with log_jumprelu_threshold
    enc_w, enc_b, dec_w, dec_b, log_thr = r(D_SAE, D_IN), r(D_SAE), r(D_IN, D_SAE), r(D_IN), \
        r(D_SAE) - 1.5
    nsf = 0.8
    add("llama_scope_tiny_r1", "fnlp/Llama-Scope-Tiny-R1", "llama_scope_r1_distill",
        {"id": "l3r_800m", "path": "800M-Slimpajama-0-OpenR1-Math-220k/L3R",
         "norm_scaling_factor": nsf},
        {"800M-Slimpajama-0-OpenR1-Math-220k/L3R/config.json": _js(
            {"d_model": D_IN, "expansion_factor": D_SAE // D_IN,
             "hook_point_in": "blocks.3.hook_resid_post"}),
         "800M-Slimpajama-0-OpenR1-Math-220k/L3R/sae_weights.safetensors": _st(
             {"encoder.weight": t(enc_w), "encoder.bias": t(enc_b), "decoder.weight": t(dec_w),
              "decoder.bias": t(dec_b), "log_jumprelu_threshold": t(log_thr)})},
        lambda x, a=(enc_w, enc_b, log_thr): jump((x * nsf) @ a[0].T + a[1], np.exp(a[2])))

    # dictionary_learning BatchTopKSAE: ae.pt + config.json; inference is a scalar threshold
    enc_w, enc_b, dec_w, b_dec = r(D_SAE, D_IN), r(D_SAE), r(D_IN, D_SAE), r(D_IN)
    add("saebench_tiny_batch_topk", "canrager/saebench_tiny", "dictionary_learning_1",
        {"id": "blocks.2.hook_resid_post__trainer_0",
         "path": "tiny_batch_top_k/resid_post_layer_2/trainer_0"},
        {"tiny_batch_top_k/resid_post_layer_2/trainer_0/ae.pt": _pt(
            {"encoder.weight": t(enc_w), "encoder.bias": t(enc_b), "decoder.weight": t(dec_w),
             "b_dec": t(b_dec), "k": torch.tensor(K), "threshold": torch.tensor(0.25)}),
         "tiny_batch_top_k/resid_post_layer_2/trainer_0/config.json": _js(
             {"trainer": {"dict_class": "BatchTopKSAE", "activation_dim": D_IN,
                          "dict_size": D_SAE, "k": K, "layer": 2, "lm_name": "tiny-lm"},
              "buffer": {"ctx_len": 128}})},
        lambda x, a=(enc_w, enc_b, b_dec): jump((x - a[2]) @ a[0].T + a[1], 0.25))

    # Qwen Scope: layerN.sae.pt, W_enc [d_sae, d_in], TopK with k from the repo name
    w_enc, w_dec, b_enc, b_dec = r(D_SAE, D_IN), r(D_IN, D_SAE), r(D_SAE), r(D_IN)
    add("qwen-scope-tiny-w1k-l8", f"Qwen/SAE-Res-Tiny-W1K-L0_{K}", "qwen_scope",
        {"id": "layer4", "path": "layer4.sae.pt", "l0": K},
        {"layer4.sae.pt": _pt({"W_enc": t(w_enc), "W_dec": t(w_dec), "b_enc": t(b_enc),
                               "b_dec": t(b_dec)})},
        lambda x, a=(w_enc, b_enc): topk(x @ a[0].T + a[1], K))

    # sparsify: cfg.json + sae.safetensors, TopK on ReLU(encoder(x - b_dec))
    enc_w, enc_b, w_dec, b_dec = r(D_SAE, D_IN), r(D_SAE), r(D_SAE, D_IN), r(D_IN)
    add("sparsify-tiny", "EleutherAI/sae-tiny-32x", "sparsify",
        {"id": "layers.6", "path": "layers.6"},
        {"layers.6/cfg.json": _js({"d_in": D_IN, "num_latents": D_SAE, "k": K,
                                   "expansion_factor": 4, "normalize_decoder": True}),
         "layers.6/sae.safetensors": _st({"encoder.weight": t(enc_w), "encoder.bias": t(enc_b),
                                          "W_dec": t(w_dec), "b_dec": t(b_dec)})},
        lambda x, a=(enc_w, enc_b, b_dec): topk(relu((x - a[2]) @ a[0].T + a[1]), K))

    # Goodfire and DeepSeek R1: one .pt of nn.Linear encoder/decoder, ReLU(encoder(x))
    for release, repo, conv, path, prefix in (
            ("goodfire-tiny-l5", "Goodfire/Tiny-SAE-l5", "goodfire", "Tiny-SAE-l5.pth",
             "encoder_linear"),
            ("deepseek-tiny-l9", "qresearch/Tiny-SAE-l9", "deepseek_r1", "Tiny-SAE-l9.pt",
             "encoder")):
        dec = "decoder_linear" if prefix == "encoder_linear" else "decoder"
        enc_w, enc_b, dec_w, dec_b = r(D_SAE, D_IN), r(D_SAE), r(D_IN, D_SAE), r(D_IN)
        add(release, repo, conv, {"id": "blocks.5.hook_resid_post", "path": path},
            {path: _pt({f"{prefix}.weight": t(enc_w), f"{prefix}.bias": t(enc_b),
                        f"{dec}.weight": t(dec_w), f"{dec}.bias": t(dec_b)})},
            lambda x, a=(enc_w, enc_b): relu(x @ a[0].T + a[1]))

    # attention SAEs over concatenated heads: <name>.pt + <name>_cfg.json
    w_enc, w_dec, b_enc, b_dec = r(D_IN, D_SAE), r(D_SAE, D_IN), r(D_SAE), r(D_IN)
    add("tiny-hook-z-kk", "ckkissane/attn-saes-tiny", "connor_rob_hook_z",
        {"id": "blocks.1.hook_z", "path": "tiny_L1_Hcat_z_v9.pt", "l0": 3.0},
        {"tiny_L1_Hcat_z_v9.pt": _pt({"W_enc": t(w_enc), "W_dec": t(w_dec), "b_enc": t(b_enc),
                                      "b_dec": t(b_dec)}),
         "tiny_L1_Hcat_z_v9_cfg.json": _js({"act_size": D_IN, "dict_size": D_SAE,
                                            "act_name": "blocks.1.attn.hook_z"})},
        lambda x, a=(w_enc, b_enc, b_dec): relu((x - a[2]) @ a[0] + a[1]))

    # a Gemma Scope 2 transcoder: a layout no architecture here represents
    srv.state.put_files("google/gemma-scope-2-tiny-pt", {
        "transcoder/layer_5_width_16k_l0_small/params.safetensors": _st(
            {"w_enc": t(r(D_IN, D_SAE)), "w_dec": t(r(D_SAE, D_IN)), "b_enc": t(r(D_SAE)),
             "b_dec": t(r(D_IN)), "threshold": t(np.abs(r(D_SAE)))})})
    table["gemma-scope-2-tiny-pt-transcoders"] = {
        "repo_id": "google/gemma-scope-2-tiny-pt", "model": "tiny-lm", "conversion_func":
        "gemma_3", "saes": [{"id": "layer_5_width_16k_l0_small",
                             "path": "transcoder/layer_5_width_16k_l0_small"}]}
    return table, refs


@pytest.fixture
def releases(hub, tmp_path, monkeypatch):
    table, refs = build_repos(hub)
    path = tmp_path / "pretrained_saes.yaml"
    path.write_text(yaml.safe_dump(table))
    monkeypatch.setenv("SAEREG_RELEASES", str(tmp_path))  # a folder holding the table
    return table, refs


def downloads(srv) -> int:
    return sum(1 for _, route in srv.state.requests if route == "resolve")


def test_pull_by_release_name(backend, mlflow_store, hub, releases, tmp_path):
    from sqlalchemy import select

    from saereg.registry.catalog import db
    from saereg.registry.catalog.schema import Publication
    from saereg.registry.catalog.writes import Catalog
    from saereg.registry.hub.release_pull import pull_release

    table, refs = releases
    x = np.random.default_rng(1).standard_normal((32, D_IN)).astype(np.float32) * 2
    runner = CliRunner()
    pulled = {}
    for i, (release, (sae_id, ref)) in enumerate(sorted(refs.items())):
        if i % 2 == 0:  # the command for half of them, the library for the rest
            result = runner.invoke(cli, ["sync", "pull", "--release", release, "--sae-id",
                                         sae_id])
            assert result.exit_code == 0, result.output
            assert "registered as" in result.output
            info = Catalog().get(f"saelens://{release}/{sae_id}")
        else:
            p = pull_release(release, sae_id)
            assert p.added and p.downloaded_bytes > 0
            info = Catalog().get(p.ref)
        pulled[release] = info
        sae = load_sae(info.ref)
        with torch.no_grad():
            mine = sae.encode(torch.from_numpy(x)).numpy()
        want = ref(x)
        assert 0 < (want > 0).sum() < want.size, release  # some latents fire, some do not
        np.testing.assert_allclose(mine, want, rtol=1e-4, atol=1e-4, err_msg=release)

        entry = table[release]["saes"][0]
        repo = table[release]["repo_id"]
        assert info.tags["saelens.release"] == release and info.tags["saelens.sae_id"] == sae_id
        assert info.tags["hub.repo"] == repo and info.tags["hub.path"] == entry["path"]
        commit = info.tags["hub.commit"]
        assert commit == hub.state.repos[repo].branches["main"]
        assert info.source_uri == f"hf://{repo}/{entry['path']}@{commit}"
        assert info.tags.get("neuronpedia.id") == entry.get("neuronpedia")
        prov = sae.cfg.metadata["saelens_release"]
        assert (prov["release"], prov["sae_id"], prov["repo"], prov["path"], prov["commit"]) == \
            (release, sae_id, repo, entry["path"], commit)
        assert sae.cfg.metadata.get("neuronpedia_id") == entry.get("neuronpedia")
        with db.session() as s:
            pubs = s.execute(select(Publication.direction, Publication.repo, Publication.path,
                                    Publication.revision, Publication.commit)
                             .where(Publication.repo == repo,
                                    Publication.path == entry["path"])).all()
        assert pubs == [("pull", repo, entry["path"], "main", commit)]

    assert pulled["tiny-res-jb"].hook == "blocks.0.hook_resid_pre"
    assert pulled["llama_scope_tiny_lxr_4x"].hook == "blocks.7.hook_resid_post"
    assert pulled["gemma-scope-tiny-pt-res"].hook == "blocks.3.hook_resid_post"
    assert pulled["qwen-scope-tiny-w1k-l8"].architecture == "topk"

    # a second pull of every SAE adds nothing and downloads nothing
    counts, before = table_counts(), downloads(hub)
    for release, (sae_id, _) in sorted(refs.items()):
        p = pull_release(release, sae_id)
        assert not p.added and p.ref == pulled[release].ref and p.downloaded_bytes == 0
    result = runner.invoke(cli, ["sync", "pull", "--release", "tiny-res-jb", "--sae-id",
                                 "blocks.0.hook_resid_pre"])
    assert result.exit_code == 0 and "already in the catalog as" in result.output
    sae = load_sae("saelens://gemma-scope-tiny-pt-res/layer_3/width_16k/average_l0_7")
    assert sae.cfg.metadata["saereg_ref"] == pulled["gemma-scope-tiny-pt-res"].ref
    assert table_counts() == counts and downloads(hub) == before
    hub.state.fail_next("revision")  # the Hub fails to answer: the copy pulled before serves
    sae = load_sae("saelens://tiny-res-jb/blocks.0.hook_resid_pre")
    assert hub.state.failures["revision"] == 0
    assert sae.cfg.metadata["saereg_ref"] == pulled["tiny-res-jb"].ref

    # a second release naming the same folder (as SAELens's "-canonical" releases do) finds the
    # version pulled before: no download, no new version, its own name resolves
    canonical = dict(table)
    canonical["gemma-scope-tiny-pt-res-canonical"] = {
        **table["gemma-scope-tiny-pt-res"],
        "saes": [{"id": "layer_3/width_16k/canonical", "path": "layer_3/width_16k/average_l0_7"}]}
    (tmp_path / "pretrained_saes.yaml").write_text(yaml.safe_dump(canonical))
    p = pull_release("gemma-scope-tiny-pt-res-canonical", "layer_3/width_16k/canonical")
    assert not p.added and p.ref == pulled["gemma-scope-tiny-pt-res"].ref
    assert Catalog().get("saelens://gemma-scope-tiny-pt-res-canonical/layer_3/width_16k/"
                         "canonical").ref == p.ref
    assert table_counts()["sae_versions"] == counts["sae_versions"] and downloads(hub) == before

    # every ref-taking command takes the release reference
    result = runner.invoke(cli, ["sae", "show", "saelens://sparsify-tiny/layers.6"])
    assert result.exit_code == 0 and pulled["sparsify-tiny"].ref in result.output


def test_unsupported_layout_and_hostile_path_record_nothing(backend, mlflow_store, hub,
                                                            releases, tmp_path):
    from saereg.registry.catalog.writes import Catalog

    table, _ = releases
    cat = Catalog()
    cat.list()
    state, requests = catalog_state(cat.store, mlflow_store), len(hub.state.requests)
    result = CliRunner().invoke(cli, ["sync", "pull", "--release",
                                      "gemma-scope-2-tiny-pt-transcoders", "--sae-id",
                                      "layer_5_width_16k_l0_small"])
    line = error_line(result, 1)
    assert "gemmascope2-transcoder layout" in line and "transcoder" in line
    assert "nothing was pulled" in line

    bad = dict(table)
    bad["hostile"] = {"repo_id": "jbloom/tiny-res", "model": "tiny-lm", "conversion_func": None,
                      "saes": [{"id": "x", "path": "../../outside"}]}
    (tmp_path / "pretrained_saes.yaml").write_text(yaml.safe_dump(bad))
    result = CliRunner().invoke(cli, ["sync", "pull", "--release", "hostile", "--sae-id", "x"])
    assert "'..'" in error_line(result, 1)
    result = CliRunner().invoke(cli, ["sync", "pull", "--release", "no-such-release",
                                      "--sae-id", "x"])
    assert "unknown release 'no-such-release'" in error_line(result, 1)
    assert catalog_state(cat.store, mlflow_store) == state
    assert len(hub.state.requests) == requests  # refused before asking the Hub anything


def test_releases_lists_the_installed_table(monkeypatch):
    monkeypatch.delenv("SAEREG_RELEASES", raising=False)
    result = CliRunner().invoke(cli, ["releases", "--search", "gemma-scope-2b-pt-res"])
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.output.splitlines()[1:] if "\t" in line]
    assert rows and all(r[0].startswith("gemma-scope-2b-pt-res") for r in rows)
    row = next(r for r in rows if r[1] == "layer_12/width_16k/average_l0_82")
    assert row[2:] == ["google/gemma-scope-2b-pt-res", "gemma-2-2b",
                       "blocks.12.hook_resid_post", "16384", "82", "gemmascope"]
    result = CliRunner().invoke(cli, ["releases", "--model", "gemma-2-2b"])
    names = {line.split("\t")[0] for line in result.output.splitlines()[1:]}
    assert {"gemma-scope-2b-pt-res", "gemma-scope-2b-pt-mlp"} <= names
    assert "(not pulled)" in result.output  # transcoders are listed, marked


def test_releases_without_sae_lens_says_how_to_install(monkeypatch):
    monkeypatch.delenv("SAEREG_RELEASES", raising=False)
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # how Python marks a module absent
    result = CliRunner().invoke(cli, ["releases"])
    line = error_line(result, 1)
    assert "pip install 'sae-registry[compat]'" in line and "pip install sae-lens" in line


def test_a_conversion_that_encodes_otherwise_is_refused(tmp_path):
    from saereg.registry.errors import SAEFormatError
    from saereg.registry.sae.published import Converted, check_encodes
    from saereg.registry.sae.published_layouts import qwenscope

    g = torch.Generator().manual_seed(3)
    raw = {"W_enc": torch.randn(D_SAE, D_IN, generator=g),
           "W_dec": torch.randn(D_IN, D_SAE, generator=g),
           "b_enc": torch.randn(D_SAE, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
    (tmp_path / "layer0.sae.pt").write_bytes(_pt(raw))
    conv = qwenscope(tmp_path / "layer0.sae.pt", {}, None, repo=f"Qwen/SAE-Res-Tiny-W1K-L0_{K}")
    check_encodes(conv, "ok")  # the converter's own reference agrees
    w_enc, b_enc, b_dec = (raw[k].numpy() for k in ("W_enc", "b_enc", "b_dec"))
    wrong = Converted(conv.sae, lambda x: torch.from_numpy(
        topk((x.numpy() - b_dec) @ w_enc.T + b_enc, K)))  # b_dec subtracted: not Qwen Scope's
    with pytest.raises(SAEFormatError, match="does not encode as its layout defines"):
        check_encodes(wrong, "qwen")


def test_release_reference_grammar():
    from saereg.registry.errors import UsageError
    from saereg.registry.refs import format_release_ref, parse_ref

    ref = parse_ref("saelens://gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82@v1.0")
    assert (ref.kind, ref.name, ref.repo_path, ref.revision) == (
        "release", "gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82", "v1.0")
    assert parse_ref(format_release_ref(ref.name, ref.repo_path)).text == \
        "saelens://gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82"
    for bad in ("saelens://gemma-scope-2b-pt-res", "saelens://rel/../etc", "saelens:///x",
                "saelens://rel/a@"):
        with pytest.raises(UsageError, match="saelens://|SAE id|release"):
            parse_ref(bad)


@pytest.mark.parametrize("cls", ["AutoEncoder", "AutoEncoderTopK", "MatryoshkaBatchTopKSAE",
                                 "JumpReluAutoEncoder", "GatedAutoEncoder"])
def test_dictionary_learning_classes_convert_as_defined(cls, tmp_path):
    """Each dictionary_learning class the release table's saebench repos hold, converted and
    written in the SAELens 6 layout, encodes as that class defines."""
    from saereg.registry.sae.folder import load_sae as load_folder
    from saereg.registry.sae.folder import save_sae
    from saereg.registry.sae.published import check_encodes, convert

    g = np.random.default_rng(5)

    def r(*shape):
        return (g.standard_normal(shape) * 0.3).astype(np.float32)

    enc_w, enc_b, dec_w, b = r(D_SAE, D_IN), r(D_SAE), r(D_IN, D_SAE), r(D_IN)
    t = torch.from_numpy
    if cls == "JumpReluAutoEncoder":
        w_enc, thr = r(D_IN, D_SAE), np.abs(r(D_SAE))
        state = {"W_enc": t(w_enc), "b_enc": t(enc_b), "W_dec": t(r(D_SAE, D_IN)), "b_dec": t(b),
                 "threshold": t(thr)}
        ref = lambda x: jump(x @ w_enc + enc_b, thr)  # noqa: E731
    elif cls == "GatedAutoEncoder":
        gate_b, mag_b, r_mag = r(D_SAE), r(D_SAE), r(D_SAE)
        state = {"encoder.weight": t(enc_w), "decoder.weight": t(dec_w), "decoder_bias": t(b),
                 "gate_bias": t(gate_b), "mag_bias": t(mag_b), "r_mag": t(r_mag)}

        def ref(x):
            e = (x - b) @ enc_w.T
            return relu(np.exp(r_mag) * e + mag_b) * (e + gate_b > 0)
    else:
        state = {"encoder.weight": t(enc_w), "encoder.bias": t(enc_b),
                 "decoder.weight": t(dec_w), ("bias" if cls == "AutoEncoder" else "b_dec"): t(b)}
        if cls == "AutoEncoder":
            ref = lambda x: relu((x - b) @ enc_w.T + enc_b)  # noqa: E731
        elif cls == "AutoEncoderTopK":
            state["k"] = torch.tensor(K)
            ref = lambda x: topk((x - b) @ enc_w.T + enc_b, K)  # noqa: E731
        else:
            state.update(k=torch.tensor(K), threshold=torch.tensor(0.3))
            ref = lambda x: jump((x - b) @ enc_w.T + enc_b, 0.3)  # noqa: E731
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    (folder / "ae.pt").write_bytes(_pt(state))
    (folder / "config.json").write_text(json.dumps(
        {"trainer": {"dict_class": cls, "layer": 4, "lm_name": "tiny-lm", "k": K}}))
    conv = convert("dictionary_learning", folder, meta={}, repo="canrager/tiny")
    conv.sae = load_folder(save_sae(conv.sae, tmp_path / "out"))
    check_encodes(conv, cls)
    x = np.random.default_rng(6).standard_normal((32, D_IN)).astype(np.float32) * 2
    with torch.no_grad():
        mine = conv.sae.encode(torch.from_numpy(x)).numpy()
    want = ref(x)
    assert 0 < (want > 0).sum() < want.size
    np.testing.assert_allclose(mine, want, rtol=1e-4, atol=1e-4)
    assert conv.sae.cfg.metadata["hook_name"] == "blocks.4.hook_resid_post"
