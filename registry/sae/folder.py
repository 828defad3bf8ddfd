"""Save and load SAE folders in the SAELens 6 layout.

A folder holds ``cfg.json``, ``sae_weights.safetensors`` and optionally
``sparsity.safetensors`` (log10 firing rate per latent). ``sae_lens.SAE.load_from_disk``
loads it unchanged. The normalisation scale is folded into the weights on save; BatchTopK and
Matryoshka SAEs are written as ``jumprelu`` with their learned threshold, as SAELens does.
Folders are written to a temporary sibling and renamed into place, so a crash never leaves
a half-written SAE.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from saereg.registry.errors import SAEFormatError
from saereg.registry.sae.architectures import ARCHITECTURE_ALIASES
from saereg.registry.sae.checks import (check_shapes, file_architecture, read_json_object,
                                        refuse_nonfinite)
from saereg.registry.sae.modules import SAE, SAE_CLASSES, SAEConfig, torch_dtype

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
LAYOUT_VERSION = "6.0.0"  # the SAELens config format these folders follow


def sae_cfg_dict(sae: SAE) -> dict[str, Any]:
    """The cfg.json content for an SAE (after folding)."""
    cfg = sae.cfg
    arch = sae.export_architecture()
    out: dict[str, Any] = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if arch == "topk":
        out["k"] = int(cfg.k)
        out["rescale_acts_by_decoder_norm"] = False
    own = {k: v for k, v in cfg.to_dict().items() if k != "metadata"}
    out["metadata"] = {
        **cfg.metadata,
        "sae_lens_version": LAYOUT_VERSION,
        "sae_lens_training_version": LAYOUT_VERSION,
        "training_architecture": cfg.architecture,
        "saereg_config": own,
    }
    return out


def write_atomic_dir(path: Path, fill, overwrite: bool = False) -> Path:
    """Create ``path`` by calling ``fill(tmpdir)`` on a temporary sibling, then renaming."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_sae(sae: SAE, path: str | Path, *, log_sparsity: torch.Tensor | None = None,
             overwrite: bool = False) -> Path:
    """Write ``sae`` (normalisation folded, on CPU) as an SAELens folder at ``path``."""
    out = copy.deepcopy(sae).to("cpu")
    out.fold_normalization()
    state = out.export_state_dict()
    cfg = sae_cfg_dict(out)

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_FILE))
        if log_sparsity is not None:
            save_file({"sparsity": log_sparsity.detach().float().cpu().contiguous()},
                      str(tmp / SPARSITY_FILE))
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    return write_atomic_dir(Path(path), fill, overwrite=overwrite)


def read_cfg(path: str | Path) -> dict[str, Any]:
    cfg_path = Path(path) / CFG_FILE
    if not cfg_path.is_file():
        raise SAEFormatError(f"{path} is not an SAE folder: {CFG_FILE} is missing")
    return read_json_object(cfg_path)


def config_from_cfg_dict(raw: dict[str, Any], where: str | Path = CFG_FILE, *,
                         warn: bool = True) -> SAEConfig:
    """SAEConfig of the module class that the folder's tensors load into. ``where`` names the
    cfg.json in messages; a config without ``architecture`` is the ReLU SAE of SAELens before
    version 6 (an :class:`InputWarning` says so when ``warn``), see
    :func:`saereg.registry.sae.checks.file_architecture`."""
    meta = dict(raw.get("metadata") or {})
    own = dict(meta.pop("saereg_config", None) or {})
    arch = ARCHITECTURE_ALIASES[file_architecture(raw, where, warn=warn)]
    merged = {**own, **{k: raw[k] for k in ("d_in", "d_sae", "dtype", "apply_b_dec_to_input", "k")
                        if k in raw}}
    merged["architecture"] = arch
    merged["metadata"] = meta
    for key in ("d_in", "d_sae"):
        if not isinstance(merged.get(key), int):
            raise SAEFormatError(f"{CFG_FILE} lacks an integer {key}")
    try:
        return SAEConfig.from_dict(merged)
    except Exception as e:  # noqa: BLE001 - any config error is a format error here
        raise SAEFormatError(f"invalid {CFG_FILE}: {e}") from e


def load_sae(path: str | Path, *, device: str | torch.device = "cpu",
             dtype: torch.dtype | str | None = None, where: str | None = None) -> SAE:
    """Load an SAE folder written by :func:`save_sae` or by SAELens.

    ``where`` names a folder that holds a stored version's files (``NAME@N``): messages say
    ``sae_weights.safetensors of NAME@N`` instead of the temporary path, and a cfg.json without
    ``architecture`` is read as ReLU without a warning (registration gave it). Weights holding
    NaN or infinite values are refused (:class:`SAEFormatError` naming the file and tensor):
    a forward pass through them yields NaN everywhere it touches."""
    path = Path(path)
    cfg_label = path / CFG_FILE if where is None else f"{CFG_FILE} of {where}"
    cfg = config_from_cfg_dict(read_cfg(path), cfg_label, warn=where is None)
    weights = path / WEIGHTS_FILE
    label = weights if where is None else f"{WEIGHTS_FILE} of {where}"
    if not weights.is_file():
        raise SAEFormatError(f"{path if where is None else where} lacks {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights))
    except Exception as e:  # noqa: BLE001
        raise SAEFormatError(f"cannot read {label}: {e}") from e
    check_shapes(cfg.architecture, cfg.d_in, cfg.d_sae,
                 {name: tuple(t.shape) for name, t in state.items()}, label)
    for name, t in state.items():
        if t.is_floating_point() and t.dtype.itemsize > 1:  # torch has no isfinite for float8
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                nan = int(torch.isnan(t).sum())
                refuse_nonfinite(label, name, nan, int((~finite).sum()) - nan, "load")
    sae = SAE_CLASSES[cfg.architecture](cfg)
    if "threshold" in state and state["threshold"].ndim == 0:
        state["threshold"] = state["threshold"].expand(cfg.d_sae).clone()
    missing, unexpected = sae.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "norm_scale"]
    if missing or unexpected:
        raise SAEFormatError(f"{label}: missing tensors {missing}, unexpected {unexpected}")
    if dtype is not None:
        dtype = torch_dtype(dtype)
    sae = sae.to(device=device, dtype=dtype) if dtype is not None else sae.to(device)
    sae.norm_scale.data = sae.norm_scale.data.float()
    return sae.eval()


def load_log_sparsity(path: str | Path) -> torch.Tensor | None:
    f = Path(path) / SPARSITY_FILE
    return load_file(str(f))["sparsity"] if f.is_file() else None
