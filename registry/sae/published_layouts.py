"""The converters of :mod:`saereg.registry.sae.published`, one per layout, each returning the
module and a reference encoder written from the layout's own definition on its raw tensors. The
facts (file names, tensor names and orientations, thresholds, scaling) are those of the layouts
as published and as SAELens reads them:

- ``saelens``: cfg.json + sae_weights.safetensors (W_enc [d_in, d_sae], ...). Configs before
  SAELens 6 (``hook_point``, ``activation_fn`` topk with ``activation_fn_kwargs.k``) are read
  too; ``normalize_activations: expected_average_only_in`` is taken only with the table's
  ``norm_scaling_factor`` s (inputs multiplied by s, outputs divided by it).
- ``gemmascope``: params.npz (W_enc [d_in, d_sae], W_dec, b_enc, b_dec, threshold; JumpReLU on
  x W_enc + b_enc, no b_dec subtracted). Embedding SAEs read x / sqrt(d_in).
- ``gemmascope2``: params.safetensors with lower-case ``w_enc`` [d_in, d_sae], ``w_dec``,
  ``b_enc``, ``b_dec``, ``threshold``; config.json (optional) says ``architecture: jump_relu``.
- ``llamascope``: hyperparams.json (d_model, d_sae, jump_relu_threshold,
  dataset_average_activation_norm.in, hook_point_in) + checkpoints/final.safetensors
  (encoder.weight [d_sae, d_in], encoder.bias, decoder.weight [d_in, d_sae], decoder.bias).
  Inputs are scaled by s (the table's norm_scaling_factor, else sqrt(d_model) / average norm);
  the threshold, one scalar for every latent, is jump_relu_threshold * sqrt(d_model) / average
  norm, compared with the pre-activation of the scaled input.
- ``llamascope-r1``: config.json (d_model, expansion_factor, hook_point_in) +
  sae_weights.safetensors (encoder/decoder weights as above, ``log_jumprelu_threshold``:
  threshold = exp); inputs scaled by the table's norm_scaling_factor (required).
- ``dictionary_learning``: ae.pt + config.json (see :mod:`saereg.registry.sae.formats`).
- ``qwenscope``: ``layerN.sae.pt`` holding W_enc [d_sae, d_in], W_dec [d_in, d_sae], b_enc,
  b_dec; TopK with k from the repo name (``...-L0_K``), no b_dec subtracted.
- ``sparsify``: cfg.json + sae.safetensors (see :mod:`saereg.registry.sae.formats`).
- ``goodfire``: one .pt/.pth with encoder_linear.{weight [d_sae, d_in], bias} and
  decoder_linear.{weight [d_in, d_sae], bias}: ReLU(encoder(x)).
- ``deepseek-r1``: one .pt with encoder.{weight, bias}, decoder.{weight, bias}: ReLU(encoder(x)).
- ``hook-z-kk``: one .pt with W_enc [d_in, d_sae], W_dec, b_enc, b_dec (ReLU on
  (x - b_dec) W_enc + b_enc) + ``<name>_cfg.json`` (act_size, dict_size, act_name).

Half-precision files (Llama Scope's bfloat16) convert to float32, without loss. Nothing is
unpickled: ``torch.load`` runs with ``weights_only=True``; npz without pickles.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from saereg.registry.errors import SAEFormatError
from saereg.registry.sae.checks import read_json_object
from saereg.registry.sae.formats import _build as _build_module
from saereg.registry.sae.formats import _need, _read_dictionary_learning, _read_sparsify
from saereg.registry.sae.published import Converted


def _build(arch: str, tensors: dict, **kw):
    """The module, in float32 when the files are in half precision (lossless: an input scale
    folded into half-precision weights would round them)."""
    import torch

    if tensors["W_enc"].dtype in (torch.float16, torch.bfloat16):
        tensors = {k: v.float() for k, v in tensors.items()}
    return _build_module(arch, tensors, **kw)


# -- raw readers ---------------------------------------------------------------------------------

def _st(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file is a format error
        raise SAEFormatError(f"cannot read {path.name} as safetensors: "
                             f"{str(e).splitlines()[0]}") from None


def _pt(path: Path) -> dict:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything that is not plain tensors
        raise SAEFormatError(f"cannot read {path.name} as a weights-only state dict: "
                             f"{str(e).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise SAEFormatError(f"{path.name} is not a state dict")
    return state


def _npz(path: Path) -> dict:
    import numpy as np
    import torch

    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
    except (OSError, ValueError) as e:
        raise SAEFormatError(f"cannot read {path.name}: {e}") from None


def _f(t):
    return t.detach().float()


def _jump(pre, threshold):
    return pre * (pre > threshold)


def _topk(pre, k: int):
    import torch

    values, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, values.clamp_min(0))


# -- converters ------------------------------------------------------------------------------

def _saelens(p: Path, meta: dict, nsf: float | None) -> Converted:
    import torch

    cfg = read_json_object(p / "cfg.json")
    st = _st(p / "sae_weights.safetensors")
    scaling = st.pop("scaling_factor", None)
    if scaling is not None and not torch.allclose(scaling, torch.ones_like(scaling)):
        raise SAEFormatError(f"{p.name}: a finetuning scaling factor other than 1 is not "
                             "supported")
    fn = cfg.get("activation_fn") or cfg.get("activation_fn_str")
    arch = cfg.get("architecture") or ("topk" if fn == "topk" else "standard")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    apply = bool(cfg.get("apply_b_dec_to_input", True))
    norm = cfg.get("normalize_activations")
    scale = 1.0
    if norm == "expected_average_only_in" and nsf:
        scale = nsf
    elif norm not in (None, False, "none"):
        raise SAEFormatError(f"{p.name}: normalize_activations {norm!r} is not supported "
                             "(expected_average_only_in only with the table's "
                             "norm_scaling_factor)")
    if cfg.get("reshape_activations") not in (None, "none") or cfg.get(
            "rescale_acts_by_decoder_norm"):
        raise SAEFormatError(f"{p.name}: reshape_activations and rescale_acts_by_decoder_norm "
                             "are not supported")
    ours = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu",
            "gated": "gated"}.get(arch)
    if ours is None:
        raise SAEFormatError(f"{p.name}: SAELens architecture {arch!r} is not supported")
    md = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    meta = {**meta, **{k2: v for k2, v in (
        ("model_name", md.get("model_name") or cfg.get("model_name")),
        ("hook_name", md.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")))
        if isinstance(v, str) and v}}
    names = ("W_enc", "W_dec", "b_dec", *(("b_gate", "b_mag", "r_mag") if ours == "gated"
                                          else ("b_enc",)),
             *(("threshold",) if ours == "jumprelu" else ()))
    _need(st, names, p / "sae_weights.safetensors")
    raw = {n: st[n] for n in names}
    if ours == "jumprelu" and raw["threshold"].ndim == 0:
        raw["threshold"] = raw["threshold"].expand(raw["W_enc"].shape[1]).clone()
    sae = _build(ours, raw, k=int(k) if ours == "topk" and k else None, apply_b_dec=apply,
                 metadata=meta, where=p)
    sae.norm_scale.fill_(scale)

    def reference(x):
        x = x * scale - (_f(raw["b_dec"]) if apply else 0)
        if ours == "gated":
            proj = x @ _f(raw["W_enc"])
            gate = proj + _f(raw["b_gate"])
            mag = proj * _f(raw["r_mag"]).exp() + _f(raw["b_mag"])
            return (gate > 0) * mag.clamp_min(0)
        pre = x @ _f(raw["W_enc"]) + _f(raw["b_enc"])
        if ours == "topk":
            return _topk(pre, int(k))
        if ours == "jumprelu":
            return _jump(pre, _f(raw["threshold"]))
        return pre.clamp_min(0)

    return Converted(sae, reference, {"normalize_scale": scale})


def _gemmascope(p: Path, meta: dict, _nsf) -> Converted:
    raw = {("W_" + k[2:] if k.startswith("w_") else k): v
           for k, v in _npz(p / "params.npz").items()}
    _need(raw, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), p / "params.npz")
    d_in = int(raw["W_enc"].shape[0])
    embed = "embedding" in p.as_posix()
    scale = 1 / math.sqrt(d_in) if embed else 1.0  # embeddings were trained scaled by sqrt(d)
    tensors = {k: raw[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
    sae = _build("jumprelu", tensors, apply_b_dec=False, metadata=meta, where=p)
    sae.norm_scale.fill_(scale)

    def reference(x):
        pre = (x * scale) @ _f(raw["W_enc"]) + _f(raw["b_enc"])
        return _jump(pre, _f(raw["threshold"]))

    return Converted(sae, reference, {"embedding_scale": scale} if embed else {})


def _gemmascope2(p: Path, meta: dict, _nsf) -> Converted:
    cfg = read_json_object(p / "config.json") if (p / "config.json").is_file() else {}
    if cfg.get("architecture", "jump_relu") != "jump_relu":
        raise SAEFormatError(f"{p.name}: Gemma Scope 2 architecture {cfg.get('architecture')!r}"
                             " is not jump_relu")
    st = _st(p / "params.safetensors")
    _need(st, ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"), p / "params.safetensors")
    if "affine_skip_connection" in st or st["w_dec"].shape[-1] != st["w_enc"].shape[0]:
        raise SAEFormatError(f"{p.name}: a transcoder (decoder width or skip connection), not "
                             "an SAE of its own hook")
    if isinstance(cfg.get("model_name"), str):
        meta = {**meta, "model_name": cfg["model_name"]}
    if isinstance(cfg.get("hf_hook_point_in"), str):
        meta = {**meta, "hf_hook_name": cfg["hf_hook_point_in"]}
    tensors = {"W_enc": st["w_enc"], "W_dec": st["w_dec"], "b_enc": st["b_enc"],
               "b_dec": st["b_dec"], "threshold": st["threshold"]}
    sae = _build("jumprelu", tensors, apply_b_dec=False, metadata=meta, where=p)

    def reference(x):
        return _jump(x @ _f(st["w_enc"]) + _f(st["b_enc"]), _f(st["threshold"]))

    return Converted(sae, reference)


def _linear_pair(st: dict, enc: str, dec: str, where: Path) -> dict:
    """W_enc/W_dec/b_enc/b_dec from nn.Linear-shaped encoder ([d_sae, d_in]) and decoder
    ([d_in, d_sae]) weights and biases."""
    _need(st, (f"{enc}.weight", f"{enc}.bias", f"{dec}.weight", f"{dec}.bias"), where)
    return {"W_enc": st[f"{enc}.weight"].T.contiguous(), "b_enc": st[f"{enc}.bias"],
            "W_dec": st[f"{dec}.weight"].T.contiguous(), "b_dec": st[f"{dec}.bias"]}


def _llamascope(p: Path, meta: dict, nsf: float | None) -> Converted:
    import torch

    hp = read_json_object(p / "hyperparams.json")
    try:
        d_model = int(hp["d_model"])
        average = float(hp["dataset_average_activation_norm"]["in"])
        jrt = float(hp["jump_relu_threshold"])
    except (KeyError, TypeError, ValueError):
        raise SAEFormatError(f"{p.name}/hyperparams.json lacks d_model, jump_relu_threshold "
                             "or dataset_average_activation_norm.in") from None
    if not average > 0 or not math.isfinite(jrt):
        raise SAEFormatError(f"{p.name}/hyperparams.json: the average norm must be positive "
                             "and the threshold finite")
    own = math.sqrt(d_model) / average
    scale, threshold = (nsf or own), jrt * own
    st = _st(p / "checkpoints" / "final.safetensors")
    tensors = _linear_pair(st, "encoder", "decoder", p / "checkpoints/final.safetensors")
    tensors["threshold"] = torch.full((tensors["W_enc"].shape[1],), threshold,
                                      dtype=tensors["W_enc"].dtype)
    if isinstance(hp.get("hook_point_in"), str):
        meta = {**meta, "hook_name": hp["hook_point_in"]}
    sae = _build("jumprelu", tensors, apply_b_dec=False, metadata=meta, where=p)
    sae.norm_scale.fill_(scale)

    def reference(x):
        pre = torch.nn.functional.linear(x * scale, _f(st["encoder.weight"]),
                                         _f(st["encoder.bias"]))
        return _jump(pre, threshold)

    return Converted(sae, reference, {"normalize_scale": scale, "threshold": threshold})


def _llamascope_r1(p: Path, meta: dict, nsf: float | None) -> Converted:
    import torch

    if not nsf:
        raise SAEFormatError(f"{p.name}: Llama Scope R1 SAEs normalise inputs by the table's "
                             "norm_scaling_factor, which this entry does not give")
    cfg = read_json_object(p / "config.json")
    st = _st(p / "sae_weights.safetensors")
    tensors = _linear_pair(st, "encoder", "decoder", p / "sae_weights.safetensors")
    _need(st, ("log_jumprelu_threshold",), p / "sae_weights.safetensors")
    tensors["threshold"] = st["log_jumprelu_threshold"].exp()
    if isinstance(cfg.get("hook_point_in"), str):
        meta = {**meta, "hook_name": cfg["hook_point_in"]}
    sae = _build("jumprelu", tensors, apply_b_dec=False, metadata=meta, where=p)
    sae.norm_scale.fill_(nsf)

    def reference(x):
        pre = torch.nn.functional.linear(x * nsf, _f(st["encoder.weight"]),
                                         _f(st["encoder.bias"]))
        return _jump(pre, _f(st["log_jumprelu_threshold"]).exp())

    return Converted(sae, reference, {"normalize_scale": nsf})


def _dictionary_learning(p: Path, meta: dict, _nsf) -> Converted:
    import torch

    sae = _read_dictionary_learning(p)
    sae.cfg.metadata.update({k: v for k, v in meta.items() if k not in sae.cfg.metadata})
    st = _pt(p / "ae.pt")
    cls = ((read_json_object(p / "config.json").get("trainer") or {}).get("dict_class")
           or ("AutoEncoder" if "bias" in st else "AutoEncoderTopK"))

    def reference(x):
        if cls == "JumpReluAutoEncoder":
            return _jump(x @ _f(st["W_enc"]) + _f(st["b_enc"]), _f(st["threshold"]))
        if cls == "GatedAutoEncoder":
            e = torch.nn.functional.linear(x - _f(st["decoder_bias"]), _f(st["encoder.weight"]))
            mag = (e * _f(st["r_mag"]).exp() + _f(st["mag_bias"])).clamp_min(0)
            return mag * (e + _f(st["gate_bias"]) > 0)
        b_dec = _f(st["bias"] if cls == "AutoEncoder" else st["b_dec"])
        pre = torch.nn.functional.linear(x - b_dec, _f(st["encoder.weight"]),
                                         _f(st["encoder.bias"]))
        if cls == "AutoEncoder":
            return pre.clamp_min(0)
        if "threshold" in st and cls != "AutoEncoderTopK" and float(st["threshold"]) >= 0:
            return pre * (pre > float(st["threshold"]))
        return _topk(pre, int(sae.cfg.k))

    return Converted(sae, reference, {"dict_class": cls})


def qwenscope(p: Path, meta: dict, _nsf, repo: str = "") -> Converted:
    st = _pt(p)
    _need(st, ("W_enc", "W_dec", "b_enc", "b_dec"), p)
    m = re.search(r"-L0_(\d+)$", repo)
    if m is None:
        raise SAEFormatError(f"{repo}: a Qwen Scope repo name ends in -L0_K (its k); this one "
                             "does not")
    k = int(m.group(1))
    tensors = {"W_enc": st["W_enc"].T.contiguous(), "W_dec": st["W_dec"].T.contiguous(),
               "b_enc": st["b_enc"], "b_dec": st["b_dec"]}
    sae = _build("topk", tensors, k=k, apply_b_dec=False, metadata=meta, where=p)

    def reference(x):
        return _topk(x @ _f(st["W_enc"]).T + _f(st["b_enc"]), k)

    return Converted(sae, reference, {"k": k})


def _sparsify(p: Path, meta: dict, _nsf) -> Converted:
    import torch

    sae = _read_sparsify(p)
    sae.cfg.metadata.update(meta)
    st = _st(p / "sae.safetensors")
    k = int(read_json_object(p / "cfg.json")["k"])

    def reference(x):
        pre = torch.nn.functional.linear(x - _f(st["b_dec"]), _f(st["encoder.weight"]),
                                         _f(st["encoder.bias"])).clamp_min(0)
        return _topk(pre, k)

    return Converted(sae, reference)


def _plain_relu(prefix: tuple[str, str]):
    def convert(p: Path, meta: dict, _nsf) -> Converted:
        import torch

        st = _pt(p)
        tensors = _linear_pair(st, *prefix, p)
        sae = _build("relu", tensors, apply_b_dec=False, metadata=meta, where=p)

        def reference(x):
            return torch.nn.functional.linear(x, _f(st[f"{prefix[0]}.weight"]),
                                              _f(st[f"{prefix[0]}.bias"])).clamp_min(0)

        return Converted(sae, reference)

    return convert


def _hook_z(p: Path, meta: dict, _nsf) -> Converted:
    st = _pt(p)
    _need(st, ("W_enc", "W_dec", "b_enc", "b_dec"), p)
    cfg_path = p.with_name(p.name.split(".pt")[0] + "_cfg.json")
    cfg = read_json_object(cfg_path)
    if isinstance(cfg.get("act_name"), str):
        meta = {**meta, "hook_name": cfg["act_name"]}
    if cfg.get("act_size") not in (None, st["W_enc"].shape[0]):
        raise SAEFormatError(f"{cfg_path.name}: act_size {cfg['act_size']} disagrees with "
                             f"W_enc {tuple(st['W_enc'].shape)}")
    tensors = {k: st[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
    sae = _build("relu", tensors, apply_b_dec=True, metadata=meta, where=p)

    def reference(x):
        return ((x - _f(st["b_dec"])) @ _f(st["W_enc"]) + _f(st["b_enc"])).clamp_min(0)

    return Converted(sae, reference)


CONVERTERS = {"saelens": _saelens, "gemmascope": _gemmascope, "gemmascope2": _gemmascope2,
              "llamascope": _llamascope, "llamascope-r1": _llamascope_r1,
              "dictionary_learning": _dictionary_learning, "qwenscope": qwenscope,
              "sparsify": _sparsify, "goodfire": _plain_relu(("encoder_linear",
                                                               "decoder_linear")),
              "deepseek-r1": _plain_relu(("encoder", "decoder")), "hook-z-kk": _hook_z}
