"""Load a causal language model; list and resolve hook points; capture activations; splice outputs.

Loading (packaged alias, folder, ``.gguf`` file, hub id; :func:`model_ref` for recorded model
names) lives in :mod:`saereg.training.lm_load` and is importable from here. Hook points are
module paths from ``model.named_modules()`` and stand for the module's output (the first
tensor when the module returns a tuple).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from saereg.registry.errors import ConfigError, HookNotFoundError
from saereg.training.lm_load import (PACKAGED_MODELS, LoadedLM, _no_progress_bars,  # noqa: F401
                                     load_lm, model_ref, packaged_gguf_path, saereg_home)


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
