"""Activations from a tensor file into an activation cache folder (``saereg cache import``).

A researcher who already has activations (from another tool, another model runner) turns a
tensor file into the same folder that ``saereg cache`` writes (see :mod:`saereg.training.cache`),
so that ``saereg train --from-cache`` and the evaluation on the cache's held-out rows accept it.

The file
    ``.safetensors``, ``.npy`` or ``.pt``/``.pth``. Nothing is unpickled: ``.npy`` is read with
    ``allow_pickle=False`` and ``.pt`` only with ``torch.load(weights_only=True)`` (a tensor or a
    dict of tensors). Every tensor imported is ``[rows, width]`` of a floating dtype; each row is
    one token's activation, and row ``i`` of every hook is the same token, so the tensors of one
    file have the same number of rows and the same dtype. They have the same width too (the
    residual stream of one model), unless ``mixed_widths`` says the hooks differ by design (an
    MLP's hidden layer beside the residual stream): tensors of two models side by side are the
    mistake this catches.

Which tensor is which hook (``--hook``, repeatable)
    ``KEY=HOOK`` stores the tensor ``KEY`` of the file as the hook ``HOOK``; a plain ``NAME``
    stores the tensor ``NAME`` as the hook of that name. A file that holds one tensor (a
    ``.npy``, a ``.pt`` of one tensor, a safetensors file with one key) takes one plain
    ``--hook HOOK`` whatever its key. Tensors of the file that no ``--hook`` names are left out.

What is written
    The last ``heldout_tokens`` rows (at most a tenth of them) become ``heldout.safetensors``,
    used for evaluation and never trained on; the rows before them become shards of
    ``shard_tokens`` rows, in the file's order (training shuffles them through its buffer),
    stored as float32 with ``token_ids`` of -1 (no token is known). The manifest records what
    is true of such rows: ``"source": {"kind": "import", ...}`` (the file, its format, the key
    of each hook, its dtype and row count), ``tokenizer``, ``context_size``, ``dataset`` and
    ``special_positions`` null, and the model given with ``--model`` (else ``"unknown"``).

Reading is shard by shard (safetensors slices, memory-mapped ``.npy`` and ``.pt``), so a file
larger than memory imports with one shard in memory at a time. Everything is written to a
hidden folder beside ``out`` that is renamed to ``out`` at the end; on any error (a NaN found in
shard 7 included) it is removed, so no half-made cache is ever left behind.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saereg.registry.errors import ConfigError, DatasetError, NotFoundError

SUFFIXES = {".safetensors": "safetensors", ".npy": "npy", ".pt": "pt", ".pth": "pt"}
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
HOOK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-\[\]]*")
SINGLE = ""  # the key of the one unnamed tensor of a .npy file or a .pt file of one tensor


@dataclass
class TensorFile:
    """The tensors of a file, described from its header, readable a block of rows at a time."""

    path: Path
    kind: str
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    read: Callable[[str, int, int], torch.Tensor]
    """``read(key, start, end)``: rows ``[start, end)`` of tensor ``key``."""
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def close(self) -> None:
        self.stack.close()


def _open_safetensors(path: Path) -> TensorFile:
    from safetensors import safe_open

    stack = contextlib.ExitStack()
    try:
        f = stack.enter_context(safe_open(str(path), framework="pt"))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: not a safetensors file
        raise DatasetError(f"cannot read {path} as safetensors: {e}") from None
    shapes, dtypes = {}, {}
    for key in f.keys():
        s = f.get_slice(key)
        shapes[key] = tuple(s.get_shape())
        raw = s.get_dtype()
        dtypes[key] = FLOAT_DTYPES.get(raw) or f"{raw.lower()} (not floating point)"
    return TensorFile(path, "safetensors", shapes, dtypes,
                      lambda key, a, b: f.get_slice(key)[a:b], stack)


def _open_npy(path: Path) -> TensorFile:
    import numpy as np

    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DatasetError(f"cannot read {path} as a .npy array (pickled objects are never "
                           f"loaded): {e}") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive behind a .npy name
        raise DatasetError(f"{path} is not a single .npy array")
    dtype = str(arr.dtype) if arr.dtype.kind == "f" else f"{arr.dtype} (not floating point)"
    return TensorFile(path, "npy", {SINGLE: tuple(arr.shape)}, {SINGLE: dtype},
                      lambda _key, a, b: torch.from_numpy(np.array(arr[a:b])))


def _weights_only_load(path: Path) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as e:
        why = str(e).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0]
        raise DatasetError(f"{path} is not a weights-only torch file ({why}); it is never "
                           f"unpickled: save a tensor or a dict of tensors with torch.save, or "
                           f"use safetensors") from None
    except Exception as e:  # noqa: BLE001 - a truncated zip, not a torch file at all
        raise DatasetError(f"cannot read {path} as a torch file: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _open_pt(path: Path) -> TensorFile:
    obj = _weights_only_load(path)
    if isinstance(obj, torch.Tensor):
        tensors = {SINGLE: obj}
    elif isinstance(obj, dict) and any(isinstance(v, torch.Tensor) for v in obj.values()):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    else:
        raise DatasetError(f"{path} holds a {type(obj).__name__}; save a tensor or a dict of "
                           f"tensors (one per hook)")
    dtypes = {k: str(v.dtype).removeprefix("torch.") if v.is_floating_point()
              else f"{str(v.dtype).removeprefix('torch.')} (not floating point)"
              for k, v in tensors.items()}
    return TensorFile(path, "pt", {k: tuple(v.shape) for k, v in tensors.items()}, dtypes,
                      lambda key, a, b: tensors[key][a:b])


def open_tensor_file(file: str | Path) -> TensorFile:
    """Describe the tensors of ``file`` without reading their values."""
    path = Path(file).expanduser()
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"unknown file type {path.suffix or '(none)'!r} of {path}; give a "
                          f"{', '.join(SUFFIXES)} file", field="file")
    if not path.is_file():
        raise DatasetError(f"no such file: {path}")
    return {"safetensors": _open_safetensors, "npy": _open_npy, "pt": _open_pt}[kind](path)


def _label(key: str) -> str:
    return "the tensor" if key == SINGLE else f"tensor {key!r}"


def map_hooks(specs: Sequence[str], tf: TensorFile) -> dict[str, str]:
    """``{hook: key}`` from the ``--hook`` values (``KEY=HOOK`` or ``NAME``; see the module
    docstring), checked against the file's tensors."""
    if not specs:
        raise ConfigError("give at least one --hook (HOOK, or KEY=HOOK for a tensor of the file)")
    keys = list(tf.shapes)
    if SINGLE in tf.shapes and len(specs) > 1:
        raise ConfigError(f"{tf.path} holds one tensor; give one --hook HOOK, not {len(specs)}")
    out: dict[str, str] = {}
    for spec in specs:
        key, sep, hook = spec.partition("=")
        if not sep:
            key = hook = spec
            if len(keys) == 1 and len(specs) == 1:
                key = keys[0]  # a file of one tensor: --hook names its hook
        elif SINGLE in tf.shapes:
            raise ConfigError(f"{tf.path} holds one unnamed tensor; give --hook HOOK, not "
                              f"{spec!r}")
        if not HOOK_NAME.fullmatch(hook) or hook == "token_ids":
            raise ConfigError(f"hook name {hook!r} (from --hook {spec!r}) must be a module path "
                              f"such as model.layers.6 or blocks.6.hook_resid_post")
        if key not in tf.shapes:
            raise NotFoundError("tensor", key, keys, hint=f"in {tf.path}; map one with "
                                f"--hook KEY=HOOK")
        if hook in out:
            raise ConfigError(f"hook {hook} is given twice in --hook")
        if key in out.values():
            raise ConfigError(f"{_label(key)} of {tf.path} is given to two hooks")
        out[hook] = key
    return out


def check_tensors(tf: TensorFile, hooks: dict[str, str], mixed_widths: bool = False
                  ) -> tuple[int, str]:
    """The row count and dtype shared by the mapped tensors (and the width, unless
    ``mixed_widths``); one clear error otherwise."""
    for hook, key in hooks.items():
        shape, dtype = tf.shapes[key], tf.dtypes[key]
        if len(shape) != 2 or 0 in shape:
            raise DatasetError(f"{_label(key)} of {tf.path} (hook {hook}) has shape "
                               f"{list(shape)}; an activation tensor is [rows, width] with rows "
                               f"and width > 0 (reshape [batch, seq, width] to [-1, width])")
        if dtype not in FLOAT_DTYPES.values():
            raise DatasetError(f"{_label(key)} of {tf.path} (hook {hook}) has dtype {dtype}; "
                               f"activations must be float16, bfloat16, float32 or float64")
    first = next(iter(hooks))
    rows, dtype = tf.shapes[hooks[first]][0], tf.dtypes[hooks[first]]
    width = tf.shapes[hooks[first]][1]
    for hook, key in hooks.items():
        if tf.shapes[key][0] != rows:
            raise DatasetError(f"{tf.path}: hook {hook} has {tf.shapes[key][0]} rows but hook "
                               f"{first} has {rows}; row i of every hook must be the same token")
        if tf.dtypes[key] != dtype:
            raise DatasetError(f"{tf.path}: hook {hook} is {tf.dtypes[key]} but hook {first} is "
                               f"{dtype}; save every hook's tensor in one dtype")
        if tf.shapes[key][1] != width and not mixed_widths:
            raise DatasetError(f"{tf.path}: hook {hook} is {tf.shapes[key][1]} wide but hook "
                               f"{first} is {width}; one model's hooks share a width (are these "
                               f"from two models?); pass --mixed-widths if they differ by design")
    return rows, dtype


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out {out} is a file; choose a folder", field="out")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"out {out} exists and is not empty; choose another folder",
                          field="out")


def _read_rows(tf: TensorFile, hooks: dict[str, str], start: int,
               end: int) -> dict[str, torch.Tensor]:
    """Rows ``[start, end)`` of every hook as float32, with ``token_ids`` of -1; refuses
    NaN and inf, naming the first bad row."""
    rows: dict[str, torch.Tensor] = {}
    for hook, key in hooks.items():
        x = tf.read(key, start, end).to(torch.float32).contiguous()
        bad = ~torch.isfinite(x).all(dim=1)
        if bool(bad.any()):
            row = start + int(bad.nonzero()[0, 0])
            raise DatasetError(f"{_label(key)} of {tf.path} (hook {hook}) holds NaN or inf at "
                               f"row {row}; drop or fix those rows before importing")
        rows[hook] = x
    rows["token_ids"] = torch.full((end - start,), -1, dtype=torch.int64)
    return rows


def import_cache(file: str | Path, hooks: Sequence[str], out: str | Path, *,
                 model: str | None = None, shard_tokens: int = 65536, heldout_tokens: int = 8192,
                 mixed_widths: bool = False, progress: bool = True,
                 stream=None) -> dict[str, Any]:
    """Write the cache folder ``out`` from the tensors of ``file``; returns its manifest.

    ``hooks`` are the ``--hook`` values (``KEY=HOOK`` or ``NAME``, see the module docstring).
    Everything is checked that can be before anything is written; the folder appears complete
    at the end or not at all."""
    from saereg.training.cache import (FORMAT, MANIFEST, _write_json_atomic, write_heldout,
                                       write_shard)

    if shard_tokens < 1:
        raise ConfigError(f"shard_tokens must be at least 1; got {shard_tokens}",
                          field="shard_tokens")
    if heldout_tokens < 0:
        raise ConfigError(f"heldout_tokens must be at least 0; got {heldout_tokens}",
                          field="heldout_tokens")
    folder = Path(out).expanduser().absolute()
    _check_out(folder)
    tf = open_tensor_file(file)
    try:
        mapping = map_hooks(hooks, tf)
        n_rows, src_dtype = check_tensors(tf, mapping, mixed_widths)
        held = min(heldout_tokens, n_rows // 10)
        n_train = n_rows - held
        source = {"kind": "import", "file": str(tf.path.resolve()), "format": tf.kind,
                  "keys": {h: (k or None) for h, k in mapping.items()}, "dtype": src_dtype,
                  "rows": n_rows}
        manifest: dict[str, Any] = {
            "format": FORMAT, "model": model or "unknown", "model_source": None,
            "hooks": list(mapping), "d_in": {h: int(tf.shapes[k][1]) for h, k in mapping.items()},
            "dataset": None, "text_column": None, "context_size": None, "dtype": "float32",
            "tokenizer": None, "special_positions": None, "source": source,
            "target_tokens": n_train, "tokens": 0, "windows": None, "complete": False,
            "shards": [], "heldout": None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        missing = [p for p in [folder.parent, *folder.parent.parents] if not p.exists()]
        tmp = folder.parent / f".{folder.name}.import-{secrets.token_hex(4)}"
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            _write_json_atomic(tmp / MANIFEST, manifest)
            last = time.perf_counter()
            for start in range(0, n_train, shard_tokens):
                end = min(start + shard_tokens, n_train)
                write_shard(tmp, manifest, _read_rows(tf, mapping, start, end), "rows",
                            [start, end])
                if progress and (time.perf_counter() - last >= 2.0 or end == n_train):
                    last = time.perf_counter()
                    print(f"[cache import] {end:,}/{n_train:,} rows", file=stream or sys.stderr,
                          flush=True)
            if held:
                write_heldout(tmp, manifest, _read_rows(tf, mapping, n_train, n_rows),
                              {"rows": f"{n_train}-{n_rows}"})
            manifest["complete"] = True
            _write_json_atomic(tmp / MANIFEST, manifest)
            _check_out(folder)  # still free: nothing appeared there meanwhile
            try:
                os.replace(tmp, folder)  # an empty folder is replaced, a full one refused
            except OSError as e:
                raise ConfigError(f"out {folder} cannot be created: {e.strerror}",
                                  field="out") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            for p in missing:  # the parent folders this call made, deepest first
                with contextlib.suppress(OSError):
                    p.rmdir()
            raise
    finally:
        tf.close()
    return manifest
