"""An on-disk activation cache: harvest once, train many times without the language model.

Layout of a cache folder::

    manifest.json              provenance and the list of finished shards
    shard-00000.safetensors    one tensor per hook ([n, d], float32) + "token_ids" ([n], int64)
    heldout.safetensors        the same for held-out text (evaluation without the model)

Each shard holds the activations of the non-special positions of whole context windows, with
the token id of every row. A cache imported from a tensor file
(:mod:`saereg.training.cache_import`) has the same files; its rows are the file's rows in order,
its ``token_ids`` are all -1 and its manifest says ``"source": {"kind": "import", ...}`` with
no tokenizer, context size or dataset.

Shards are written to a temporary name and renamed into place, and the manifest (rewritten
atomically after every shard) lists only finished shards; its
``complete`` flag turns true at the very end. A cache whose writer died is therefore never
taken for a finished one: training refuses it, and running the same ``cache`` command again
resumes after its last finished shard.

:class:`CacheStream` feeds the trainer from a cache through the same shuffling buffer as
:class:`saereg.training.activations.ActivationStream`, so the training module does not change. In a
data-parallel job each process reads its own contiguous block of rows of every shard (a
1/world_size share, sliced from the file without loading the rest).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saereg.registry.errors import ConfigError, DatasetError
from saereg.training.activations import ActivationStream
from saereg.training.corpus import dataset_name

MANIFEST = "manifest.json"
FORMAT = "saereg-activation-cache/1"
HELDOUT = "heldout.safetensors"


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_manifest(path: str | Path, *, require_complete: bool = True) -> dict[str, Any]:
    """The manifest of the cache at ``path``; one clear error for anything that is not a
    finished cache."""
    folder = Path(path).expanduser()
    f = folder / MANIFEST
    if not f.is_file():
        raise ConfigError(f"{folder} is not an activation cache (no {MANIFEST}); "
                          f"make one with: saereg cache MODEL --hook H --tokens N --out {folder}")
    try:
        manifest = json.loads(f.read_text())
    except ValueError as e:
        raise ConfigError(f"{f} is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{folder}: unknown cache format {manifest.get('format')!r}")
    if require_complete and not manifest.get("complete"):
        raise ConfigError(f"activation cache {folder} is incomplete ({manifest.get('tokens', 0)} "
                          f"of {manifest.get('target_tokens')} tokens); finish it by running "
                          f"the same saereg cache command again")
    missing = [s["file"] for s in manifest.get("shards", []) if not (folder / s["file"]).is_file()]
    if missing:
        raise ConfigError(f"activation cache {folder} lacks shard files: {', '.join(missing[:3])}")
    return manifest


@dataclass
class CacheSource:
    """Stands in for the language model when training from a cache (name and device)."""

    path: Path
    manifest: dict[str, Any]
    device: torch.device

    @property
    def name(self) -> str:
        return self.manifest["model"]

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def d_ins(self) -> dict[str, int]:
        return {h: int(d) for h, d in self.manifest["d_in"].items()}

    @property
    def imported(self) -> bool:
        """Rows from a tensor file (``saereg cache import``): no tokenizer, context windows,
        BOS or special-token handling, dataset or token ids apply to them."""
        return (self.manifest.get("source") or {}).get("kind") == "import"

    def sae_facts(self) -> dict[str, Any]:
        """What the cfg.json metadata of an SAE trained from this cache says in place of the
        job's settings: for an imported cache, null tokenizer, context size, BOS and
        special-token handling and dataset (none applied to its rows), and the file they came
        from; nothing for a harvested one (the job's settings are its own)."""
        if not self.imported:
            return {}
        return {"context_size": None, "prepend_bos": None, "exclude_special_tokens": None,
                "dataset_path": None, "tokenizer": None,
                "activation_file": self.manifest["source"]["file"]}


def load_shard(folder: Path, name: str, hooks: list[str], *, rank: int = 0,
               world_size: int = 1) -> dict[str, torch.Tensor]:
    """The tensors of ``hooks`` plus ``token_ids`` of one shard; with ``world_size`` > 1 only
    rank's block of rows, ``[n * rank // world_size, n * (rank + 1) // world_size)``."""
    names = [*hooks, "token_ids"]
    if world_size == 1:
        from safetensors.torch import load_file

        data = load_file(str(folder / name))
        return {h: data[h] for h in names}
    from safetensors import safe_open

    with safe_open(str(folder / name), framework="pt") as f:
        n = f.get_slice("token_ids").get_shape()[0]
        start, end = n * rank // world_size, n * (rank + 1) // world_size
        return {h: f.get_slice(h)[start:end] for h in names}


class CacheStream(ActivationStream):
    """Batches ``{hook: Tensor[batch_tokens, d]}`` read from a cache's shards, mixed through the
    same buffer as the model stream. ``windows_consumed`` counts shards, so a resumed job
    continues after the shards it has read; the shards are read again in a new pass if the
    token budget exceeds the cache."""

    def __init__(self, source: CacheSource, hooks: list[str], *, batch_tokens: int,
                 buffer_tokens: int, seed: int = 0, skip_shards: int = 0, device=None,
                 max_epochs: int = 1000, rank: int = 0, world_size: int = 1):
        missing = [h for h in hooks if h not in source.hooks]
        if missing:
            raise ConfigError(f"hook {missing[0]} is not in the cache {source.path}; it holds "
                              f"{', '.join(source.hooks)}")
        self.source = source
        self.lm = None
        self._init_buffer(hooks, batch_tokens=batch_tokens, buffer_tokens=buffer_tokens,
                          seed=seed, skip=skip_shards, max_epochs=max_epochs)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.rank, self.world_size = rank, world_size
        self._shards = [s["file"] for s in source.manifest["shards"]]
        if not self._shards:
            raise DatasetError(f"activation cache {source.path} holds no shards")

    def _lm_batches(self) -> Iterator[str]:
        while self.epoch < self.max_epochs:
            for i in range(self.windows_consumed % len(self._shards), len(self._shards)):
                self.windows_consumed = i + 1
                yield self._shards[i]
            self.epoch += 1
            self.windows_consumed = 0
            print(f"[saereg] cache exhausted; starting pass {self.epoch + 1} over it",
                  file=sys.stderr)
        raise DatasetError(f"the cache ran out after {self.max_epochs} passes")

    def harvest(self, shard: str) -> dict[str, torch.Tensor]:  # type: ignore[override]
        data = load_shard(self.source.path, shard, self.hooks, rank=self.rank,
                          world_size=self.world_size)
        self._digest.update(data["token_ids"].numpy().tobytes())
        out = {h: data[h].to(self.device, torch.float32) for h in self.hooks}
        self.tokens_harvested += int(data["token_ids"].shape[0])
        return out


def cache_provenance(lm, hooks: list[str], *, dataset: str | None, text_column: str | None,
                     context_size: int) -> dict[str, Any]:
    from saereg.training.lm import hook_dim

    tok = lm.tokenizer
    return {
        "model": lm.name, "model_source": lm.source, "hooks": list(hooks),
        "d_in": {h: hook_dim(lm, h) for h in hooks},
        "dataset": dataset_name(dataset), "text_column": text_column,
        "context_size": context_size, "dtype": "float32",
        "tokenizer": {"class": type(tok).__name__, "name_or_path": str(tok.name_or_path),
                      "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
                      "eos_token_id": tok.eos_token_id},
        "special_positions": "excluded (BOS, EOS, padding)",
    }


def _fmt(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def write_shard(folder: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
                span_name: str, span: list[int]) -> int:
    """Write the next shard of ``manifest`` (``tensors``: one per hook plus ``token_ids``) and
    record it: the file first (atomically), then the manifest that lists it. ``span`` is the
    shard's ``[start, end)`` in ``span_name`` units ("windows" of text, or "rows" of an
    imported file), kept in the manifest entry and the file's metadata."""
    name = f"shard-{len(manifest['shards']):05d}.safetensors"
    n = int(tensors["token_ids"].shape[0])
    _save_atomic(tensors, folder / name, {span_name: f"{span[0]}-{span[1]}"})
    manifest["shards"].append({"file": name, "tokens": n, span_name: list(span)})
    manifest["tokens"] += n
    _write_json_atomic(folder / MANIFEST, manifest)
    return n


def write_heldout(folder: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> int:
    """Write the held-out rows (evaluation only, never trained on) and note them in
    ``manifest`` (the caller writes it when the cache is complete)."""
    n = int(tensors["token_ids"].shape[0])
    _save_atomic(tensors, folder / HELDOUT, metadata or {"windows": "0-0"})
    manifest["heldout"] = {"file": HELDOUT, "tokens": n}
    return n


def write_cache(lm, hooks: list[str], out: str | Path, tokens: int, *,
                dataset: str | None = None, text_column: str | None = None,
                context_size: int = 128, lm_batch_size: int = 8, shard_tokens: int = 65536,
                heldout_tokens: int = 8192, progress: bool = True, stream=None) -> dict[str, Any]:
    """Harvest ``tokens`` activations of ``hooks`` into the folder ``out`` (resumable).

    Running it again on an incomplete cache with the same provenance continues after the
    last finished shard; a different model, hooks, dataset or context size is refused."""
    from saereg.training.data import TokenWindows
    from saereg.training.lm import ActivationCapture, resolve_hooks, special_token_mask

    if tokens <= 0 or shard_tokens <= 0:
        raise ConfigError("--tokens and --shard-tokens must be positive")
    hooks = resolve_hooks(lm, hooks)
    folder = Path(out).expanduser()
    prov = cache_provenance(lm, hooks, dataset=dataset, text_column=text_column,
                            context_size=context_size)
    if (folder / MANIFEST).is_file():
        manifest = read_manifest(folder, require_complete=False)
        changed = [k for k in prov if manifest.get(k) != prov[k]]
        if changed:
            raise ConfigError(f"{folder} holds a cache with another {', '.join(changed)}; "
                              f"choose another --out folder")
        if manifest["complete"]:
            raise ConfigError(f"{folder} already holds a complete cache "
                              f"({manifest['tokens']} tokens)")
        manifest["target_tokens"] = tokens
    elif folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"{folder} exists and is not empty; choose another --out folder")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, **prov, "target_tokens": tokens, "tokens": 0,
                    "windows": 0, "complete": False, "shards": [], "heldout": None,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write_json_atomic(folder / MANIFEST, manifest)
    capture = ActivationCapture(lm, hooks)
    out_stream = stream or sys.stderr

    def harvest(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        acts = capture(ids)
        keep = ~special_token_mask(lm.tokenizer, ids)
        rows = {h: acts[h][keep.to(acts[h].device)].float().cpu() for h in hooks}
        rows["token_ids"] = ids[keep].long().cpu()
        return rows

    windows = TokenWindows(lm.tokenizer, context_size, dataset=dataset, text_column=text_column,
                           skip_windows=manifest["windows"])
    t0, done0, last = time.perf_counter(), manifest["tokens"], 0.0
    chunks: dict[str, list[torch.Tensor]] = {k: [] for k in [*hooks, "token_ids"]}
    size = nwin = 0
    batches = windows.batches(lm_batch_size)
    while manifest["tokens"] < tokens:
        item = next(batches, None)
        if item is None and size == 0:
            raise DatasetError(f"the dataset ran out after {manifest['tokens']} tokens; give "
                               f"more text or fewer --tokens (the cache so far stays resumable)")
        if item is not None:
            rows = harvest(item[0])
            for k, v in rows.items():
                chunks[k].append(v)
            size += int(rows["token_ids"].shape[0])
            nwin += int(item[0].shape[0])
        if size >= shard_tokens or item is None or manifest["tokens"] + size >= tokens:
            span = [manifest["windows"], manifest["windows"] + nwin]
            manifest["windows"] += nwin
            write_shard(folder, manifest, {k: torch.cat(v) for k, v in chunks.items()},
                        "windows", span)
            chunks = {k: [] for k in chunks}
            size = nwin = 0
        now = time.perf_counter()
        if progress and (now - last >= 2.0 or manifest["tokens"] >= tokens):
            last = now
            done = manifest["tokens"] + size
            rate = (done - done0) / max(now - t0, 1e-9)
            eta = (tokens - done) / rate if rate > 0 else float("nan")
            eta_s = f"{int(eta // 60):02d}:{int(eta % 60):02d}" if eta == eta else "--:--"
            print(f"[cache] {_fmt(done)}/{_fmt(tokens)} tokens  {rate:,.0f} tok/s  ETA {eta_s}",
                  file=out_stream, flush=True)
        if item is None:
            break
    if heldout_tokens > 0 and manifest.get("heldout") is None:
        held = TokenWindows(lm.tokenizer, context_size, dataset=dataset,
                            text_column=text_column, held_out=True)
        hchunks: dict[str, list[torch.Tensor]] = {k: [] for k in [*hooks, "token_ids"]}
        got = 0
        for ids, _ in held.batches(lm_batch_size):
            rows = harvest(ids)
            for k, v in rows.items():
                hchunks[k].append(v)
            got += int(rows["token_ids"].shape[0])
            if got >= heldout_tokens:
                break
        if got:
            write_heldout(folder, manifest, {k: torch.cat(v) for k, v in hchunks.items()})
    manifest["complete"] = True
    _write_json_atomic(folder / MANIFEST, manifest)
    return manifest


@torch.no_grad()
def evaluate_from_cache(source: CacheSource, saes: dict[str, tuple[str, Any]],
                        max_tokens: int) -> dict[str, dict[str, float]]:
    """Reconstruction metrics on the cache's held-out activations (no model, so no CE-loss
    score or KL): explained_variance (and per token), mse per element, l0, shrinkage,
    dead_fraction."""
    from saereg.training.evaluate import per_token_ev, token_variance

    held = source.manifest.get("heldout")
    if not held or max_tokens <= 0:
        return {sid: {} for sid in saes}
    hooks = list(dict.fromkeys(h for h, _ in saes.values()))
    data = load_shard(source.path, held["file"], hooks)
    out: dict[str, dict[str, float]] = {}
    for sid, (hook, sae) in saes.items():
        x = data[hook][:max_tokens].to(source.device, torch.float32)
        acts = sae.encode(x)
        x_hat = sae.decode(acts)
        x64 = x.double()
        per_token = (x64 - x_hat.double()).pow(2).sum(-1)
        var = token_variance(x64)
        resid, total = per_token.sum(), var.sum().clamp_min(1e-12)
        out[sid] = {
            "explained_variance": float(1 - resid / total),
            "explained_variance_per_token": float(per_token_ev(per_token, var).mean()),
            "mse": float(resid / x.numel()),
            "l0": float((acts > 0).sum(-1).float().mean()),
            "shrinkage": float((x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).mean()),
            "dead_fraction": float(((acts > 0).sum(0) == 0).float().mean()),
        }
    return out
