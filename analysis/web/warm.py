"""Language models and SAEs kept loaded between requests, and the activations of a prompt.

A server process loads each model and SAE once and keeps the most recently used few
(:class:`WarmModels`, a small LRU cache), so requests never reload them. A model is shared by
every request, and a forward on it installs hooks on its modules (activation capture,
steering), so each model has a lock and only one request runs it at a time.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from saereg.registry.errors import SaeRegError, UsageError

MAX_TOP = 32
"""Most features a prompt token may list."""
LOCK_WAIT_S = 600.0


class ModelBusyError(SaeRegError):
    """Another request kept the model for longer than a request waits."""


@dataclass
class _Model:
    lm: Any
    lock: threading.Lock


class WarmModels:
    """Models by name and SAEs by (reference, device), the least recently used dropped first."""

    def __init__(self, database_url: str | None = None, *, max_models: int = 2,
                 max_saes: int = 8):
        self.database_url = database_url
        self.max_models, self.max_saes = max_models, max_saes
        self._models: OrderedDict[str, _Model] = OrderedDict()
        self._saes: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._model_lock = threading.Lock()  # loading a model never holds up an SAE lookup
        self._sae_lock = threading.Lock()
        self.loads = {"models": 0, "saes": 0}
        """How many times a model or an SAE was loaded (not served from the cache)."""

    def _model(self, name: str) -> _Model:
        from saereg.analysis.lm import load_model

        return self._cached(self._models, self._model_lock, name, self.max_models, "models",
                            lambda: _Model(load_model(name), threading.Lock()))

    def sae(self, ref: str, device: Any = "cpu"):
        """The SAE of catalog version ``ref`` (``NAME@N``) on ``device``."""
        key = (ref, str(device))
        from saereg.registry.api import load_sae

        return self._cached(self._saes, self._sae_lock, key, self.max_saes, "saes", lambda: load_sae(
            ref, device=device, database_url=self.database_url).requires_grad_(False))

    def _cached(self, cache: OrderedDict, lock: threading.Lock, key, limit: int, kind: str,
                make):
        """``cache[key]``, made by ``make()`` on a miss (counted in ``loads[kind]``), the least
        recently used entries dropped beyond ``limit``."""
        with lock:
            value = cache.get(key)
            if value is None:
                value = cache[key] = make()
                self.loads[kind] += 1
                while len(cache) > limit:
                    cache.popitem(last=False)
            cache.move_to_end(key)
            return value

    @contextlib.contextmanager
    def using(self, model: str, cancelled: threading.Event | None = None) -> Iterator[Any]:
        """The loaded model ``model``, held by this thread alone while the block runs."""
        entry = self._model(model)
        waited = 0.0
        while not entry.lock.acquire(timeout=0.25):
            waited += 0.25
            if cancelled is not None and cancelled.is_set():
                raise ModelBusyError("the request was cancelled while the model was busy")
            if waited >= LOCK_WAIT_S:
                raise ModelBusyError(f"model {model} stayed busy with other requests for "
                                     f"{LOCK_WAIT_S:.0f} s; try again")
        try:
            yield entry.lm
        finally:
            entry.lock.release()


def prompt_tokens(models: WarmModels, info, text: str, *, feature: int | None,
                  top: int) -> list[dict[str, Any]]:
    """One dict per token of ``text`` on SAE version ``info``: ``position``, ``token`` (its
    display form), ``special`` (BOS and the like), ``act`` (the activation of ``feature``,
    when one is given) and ``features``, the ``top`` strongest features as
    ``[index, activation, current label]``."""
    import torch

    from saereg.analysis.current import current_labels
    from saereg.analysis.stats import check_index
    from saereg.analysis.tokens import display_token
    from saereg.training.lm import ActivationCapture, special_token_mask

    if not text or not text.strip():
        raise UsageError("the prompt is empty")
    if feature is not None:
        check_index(info, feature)
    if not 0 <= top <= MAX_TOP:
        raise UsageError(f"top must be between 0 and {MAX_TOP}, got {top}")
    with models.using(info.model) as lm:
        ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
        if ids.shape[1] > lm.context_limit:
            raise UsageError(f"the prompt is {ids.shape[1]} tokens, longer than the model's "
                             f"context ({lm.context_limit})")
        sae = models.sae(info.ref, lm.device)
        with torch.no_grad():
            x = ActivationCapture(lm, [info.hook])(ids)[info.hook]
            acts = sae.encode(x.to(sae.W_enc.dtype))[0].float().cpu()
        special = special_token_mask(lm.tokenizer, ids)[0].tolist()
        tokens = lm.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    k = min(top, acts.shape[-1])
    vals, idx = acts.topk(k, dim=-1) if k else (acts[:, :0], acts[:, :0].long())
    labels = current_labels(info.id, sorted(set(idx[vals > 0].tolist())),
                            models.database_url) if k else {}
    out = []
    for pos, tok in enumerate(tokens):
        item: dict[str, Any] = {"position": pos, "token": display_token(tok),
                                "special": bool(special[pos])}
        if feature is not None:
            item["act"] = round(float(acts[pos, feature]), 5)
        if k:
            item["features"] = [[int(i), round(float(v), 5), labels.get(int(i))]
                                for v, i in zip(vals[pos], idx[pos]) if v > 0]
        out.append(item)
    return out
