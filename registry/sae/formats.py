"""Foreign SAE layouts: detect, convert to this project's module, import into the catalog, and
export to the SAELens and sparsify layouts.

Layouts read:

- ``saelens``: cfg.json + sae_weights.safetensors (standard, topk, jumprelu, gated; SAELens
  writes batchtopk and matryoshka as jumprelu), loaded as is.
- ``sparsify``: cfg.json {d_in, num_latents, k, ...} + sae.safetensors with ``encoder.weight``
  [num_latents, d_in], ``encoder.bias``, ``W_dec`` [num_latents, d_in], ``b_dec``. Encoding is
  ReLU(encoder(x - b_dec)) keeping the k largest: a topk SAE with W_enc = encoder.weight^T.
- ``gemmascope``: params.npz with ``W_enc`` [d_in, d_sae], ``W_dec``, ``b_enc``, ``b_dec``,
  ``threshold``: JumpReLU on x @ W_enc + b_enc (b_dec is not subtracted from the input).
- ``dictionary_learning``: ae.pt (a state dict, read with ``torch.load(weights_only=True)``)
  plus config.json whose ``trainer.dict_class`` is AutoEncoder (``encoder.weight`` [d_sae, d_in],
  ``encoder.bias``, ``decoder.weight`` [d_in, d_sae], ``bias``: ReLU(encoder(x - bias))),
  AutoEncoderTopK (``b_dec`` instead of ``bias``, ``k``), BatchTopKSAE or
  MatryoshkaBatchTopKSAE (plus a scalar ``threshold``: a jumprelu with that threshold on every
  latent) or JumpReluAutoEncoder (``W_enc`` [d_in, d_sae], ``b_enc``, ``W_dec``, ``b_dec``,
  ``threshold``: JumpReLU on x @ W_enc + b_enc, b_dec not subtracted) or GatedAutoEncoder
  (``encoder.weight`` without bias, ``decoder.weight``, ``decoder_bias``, ``gate_bias``,
  ``mag_bias``, ``r_mag``: with e = encoder(x - decoder_bias), ReLU(exp(r_mag) e + mag_bias)
  where e + gate_bias > 0).

Nothing is unpickled: safetensors, JSON, npz without pickles, ``torch.load`` with
``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

from saereg.registry.errors import SAEFormatError, UsageError
from saereg.registry.sae.checks import check_shapes, read_json_object

FORMATS = ("saelens", "sparsify", "gemmascope", "dictionary_learning")
EXPORT_FORMATS = ("saelens", "sparsify")


def detect_format(path: str | Path) -> str:
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".npz":
        return "gemmascope"
    if not p.is_dir():
        raise UsageError(f"{path}: no such directory or params.npz file")
    if (p / "sae_weights.safetensors").is_file():
        return "saelens"
    if (p / "sae.safetensors").is_file():
        return "sparsify"
    if (p / "params.npz").is_file():
        return "gemmascope"
    if (p / "ae.pt").is_file():
        return "dictionary_learning"
    raise SAEFormatError(f"{path}: not a known SAE layout (looked for sae_weights.safetensors, "
                         "sae.safetensors, params.npz, ae.pt)")


def _need(state: dict, keys: tuple[str, ...], where: Path) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise SAEFormatError(f"{where} lacks tensor(s) {', '.join(missing)}")


def _build(arch: str, tensors: dict, *, k: int | None = None, apply_b_dec: bool = True,
           metadata: dict | None = None, where: Path):
    """An SAE module of ``arch`` holding ``tensors`` (W_enc [d_in, d_sae], ...)."""
    import torch

    from saereg.registry.sae.modules import SAE_CLASSES, SAEConfig, dtype_name

    w_enc = tensors["W_enc"]
    d_in, d_sae = int(w_enc.shape[0]), int(w_enc.shape[1])
    dtype = dtype_name(w_enc.dtype) or "float32"
    try:
        cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k, dtype=dtype,
                        apply_b_dec_to_input=apply_b_dec, metadata=dict(metadata or {}))
    except Exception as e:  # noqa: BLE001 - a config error here is a format error
        raise SAEFormatError(f"{where}: {e}") from None
    check_shapes(arch, d_in, d_sae, {name: tuple(v.shape) for name, v in tensors.items()}, where,
                 sizes_from="W_enc")
    sae = SAE_CLASSES[arch](cfg)
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(sae, name).copy_(torch.as_tensor(value).to(getattr(sae, name).dtype))
    return sae.eval()


def _read_sparsify(p: Path):
    from safetensors.torch import load_file

    cfg = read_json_object(p / "cfg.json")
    if cfg.get("skip_connection") or cfg.get("transcode"):
        raise SAEFormatError(f"{p}: sparsify transcoders and skip connections are not SAEs this "
                             "project can represent")
    st = load_file(str(p / "sae.safetensors"))
    _need(st, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), p / "sae.safetensors")
    k = cfg.get("k")
    if not isinstance(k, int):
        raise SAEFormatError(f"{p / 'cfg.json'} lacks an integer k")
    if isinstance(cfg.get("d_in"), int) and cfg["d_in"] != st["b_dec"].shape[0]:
        raise SAEFormatError(f"{p}: cfg.json says d_in={cfg['d_in']} but b_dec has "
                             f"{st['b_dec'].shape[0]} entries")
    return _build("topk", {"W_enc": st["encoder.weight"].T.contiguous(),
                           "b_enc": st["encoder.bias"], "W_dec": st["W_dec"],
                           "b_dec": st["b_dec"]}, k=k, where=p)


def _read_gemmascope(p: Path):
    import numpy as np
    import torch

    f = p if p.is_file() else p / "params.npz"
    try:
        with np.load(f, allow_pickle=False) as npz:
            params = {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
    except (OSError, ValueError) as e:
        raise SAEFormatError(f"cannot read {f}: {e}") from None
    _need(params, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), f)
    return _build("jumprelu", {k: params[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec",
                                                      "threshold")},
                  apply_b_dec=False, where=f)


def _read_dictionary_learning(p: Path):
    import torch

    cfg = read_json_object(p / "config.json") if (p / "config.json").is_file() else {}
    trainer = cfg.get("trainer") or {}
    try:
        st = torch.load(p / "ae.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything that is not a plain state dict
        raise SAEFormatError(f"cannot read {p / 'ae.pt'} as a weights-only state dict: "
                             f"{str(e).splitlines()[0]}") from None
    if not isinstance(st, dict):
        raise SAEFormatError(f"{p / 'ae.pt'} is not a state dict")
    cls = trainer.get("dict_class") or ("AutoEncoder" if "bias" in st else "AutoEncoderTopK")
    layer = trainer.get("layer")
    meta = {"model_name": trainer.get("lm_name"), "hook_name": trainer.get("submodule_name") or (
        f"blocks.{layer}.hook_resid_post" if isinstance(layer, int) else None)}
    meta = {k: v for k, v in meta.items() if v}
    if cls == "JumpReluAutoEncoder":  # encodes x @ W_enc + b_enc, no b_dec subtracted
        _need(st, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), p / "ae.pt")
        return _build("jumprelu", {k: st[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec",
                                                      "threshold")},
                      apply_b_dec=False, metadata=meta, where=p)
    if cls == "GatedAutoEncoder":  # gate and magnitude share encoder(x - decoder_bias)
        _need(st, ("encoder.weight", "decoder.weight", "decoder_bias", "gate_bias", "mag_bias",
                   "r_mag"), p / "ae.pt")
        return _build("gated", {"W_enc": st["encoder.weight"].T.contiguous(),
                                "W_dec": st["decoder.weight"].T.contiguous(),
                                "b_dec": st["decoder_bias"], "b_gate": st["gate_bias"],
                                "b_mag": st["mag_bias"], "r_mag": st["r_mag"]},
                      metadata=meta, where=p)
    if cls == "AutoEncoder":
        _need(st, ("encoder.weight", "encoder.bias", "decoder.weight", "bias"), p / "ae.pt")
        return _build("relu", {"W_enc": st["encoder.weight"].T.contiguous(),
                               "b_enc": st["encoder.bias"],
                               "W_dec": st["decoder.weight"].T.contiguous(),
                               "b_dec": st["bias"]}, metadata=meta, where=p)
    if cls in ("AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        _need(st, ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec"), p / "ae.pt")
        k = int(st["k"]) if "k" in st else trainer.get("k")
        tensors = {"W_enc": st["encoder.weight"].T.contiguous(), "b_enc": st["encoder.bias"],
                   "W_dec": st["decoder.weight"].T.contiguous(), "b_dec": st["b_dec"]}
        if cls != "AutoEncoderTopK" and "threshold" in st and float(st["threshold"]) >= 0:
            d_sae = tensors["W_enc"].shape[1]
            tensors["threshold"] = st["threshold"].float().reshape(()).expand(d_sae).clone()
            return _build("jumprelu", tensors, metadata=meta, where=p)
        return _build("topk", tensors, k=k, metadata=meta, where=p)
    raise SAEFormatError(f"{p}: dictionary_learning class {cls!r} is not supported (AutoEncoder, "
                         "AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE, "
                         "JumpReluAutoEncoder, GatedAutoEncoder)")


def read_foreign(path: str | Path, fmt: str = "auto"):
    """Load an SAE in any known layout as this project's module."""
    from saereg.registry.sae.folder import load_sae

    p = Path(path).expanduser()
    fmt = detect_format(p) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    if fmt == "saelens":
        raw = read_json_object(p / "cfg.json")
        if raw.get("rescale_acts_by_decoder_norm") or raw.get("normalize_activations") not in (
                None, "none") or raw.get("reshape_activations") not in (None, "none"):
            raise SAEFormatError(f"{p}: SAELens options rescale_acts_by_decoder_norm, "
                                 "normalize_activations and reshape_activations are not supported")
        return load_sae(p)
    reader = {"sparsify": _read_sparsify, "gemmascope": _read_gemmascope,
              "dictionary_learning": _read_dictionary_learning}[fmt]
    return reader(p)


def export_sparsify(sae, dest: str | Path, *, overwrite: bool = False) -> Path:
    """Write a topk SAE in the sparsify layout (cfg.json + sae.safetensors)."""
    import copy

    from safetensors.torch import save_file

    from saereg.registry.sae.folder import write_atomic_dir

    if sae.cfg.architecture != "topk" or not sae.cfg.apply_b_dec_to_input:
        raise UsageError(f"the sparsify layout holds topk SAEs that subtract b_dec from the "
                         f"input; this one is {sae.cfg.architecture}")
    out = copy.deepcopy(sae).to("cpu")
    out.fold_normalization()
    state = {"encoder.weight": out.W_enc.detach().T.contiguous(),
             "encoder.bias": out.b_enc.detach().contiguous(),
             "W_dec": out.W_dec.detach().contiguous(), "b_dec": out.b_dec.detach().contiguous()}
    cfg = {"d_in": out.cfg.d_in, "num_latents": out.cfg.d_sae, "k": int(out.cfg.k),
           "expansion_factor": max(1, out.cfg.d_sae // out.cfg.d_in), "normalize_decoder": True,
           "multi_topk": False, "skip_connection": False, "transcode": False}

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / "sae.safetensors"))
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")

    dest = Path(dest).expanduser()
    if dest.exists() and not overwrite:
        raise UsageError(f"{dest} already exists (pass --force to replace it)")
    return write_atomic_dir(dest, fill, overwrite=overwrite)
