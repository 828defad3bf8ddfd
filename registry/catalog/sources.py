"""What a registration reads: an SAE folder (this project's or SAELens's), or an MLflow run.

Everything here only reads and checks; nothing is written. A folder is checked without torch:
``cfg.json`` is parsed, the shapes come from the safetensors header and every floating-point
tensor is read once (in chunks, with numpy) for NaN and infinite values, so a folder whose
config disagrees with its tensors, or whose weights are not finite, is refused before a single
byte is stored.

Metrics follow one rule (:func:`given_metrics`, :func:`finite_metrics`): metrics a caller
passes in are input and a non-finite one is refused, naming it; metrics read from a source (an
MLflow run's final metrics, a Hub record) that are NaN or infinite are legitimate there (an
evaluation can yield NaN) but are not copied into the catalog, with an :class:`InputWarning`
naming each one, so that neither the metrics JSON nor a key-metric column ever holds NaN. The
run itself keeps them.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saereg.registry.errors import (ConfigError, InputWarning, NotFoundError, SAEFormatError,
                                    SaeRegError, UsageError, redact)
from saereg.registry.sae.architectures import ARCHITECTURE_ALIASES
from saereg.registry.sae.checks import (check_shapes, file_architecture, finite_number,
                                        nonfinite_in_json, read_json_object, refuse_nonfinite)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SAE_FILES = (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE)
RUN_ARTIFACT = "sae"
MAX_HEADER = 100 << 20
FLOAT_DTYPES = {"F16": "<f2", "BF16": "<u2", "F32": "<f4", "F64": "<f8"}  # safetensors -> numpy
CHUNK_BYTES = 16 << 20  # read per step when scanning tensor values


@dataclass
class Source:
    """A checked SAE ready to be stored and recorded."""

    folder: Path
    files: list[str]
    cfg: dict[str, Any]
    model: str
    hook: str
    architecture: str
    d_in: int
    d_sae: int
    kind: str                       # "folder" or "mlflow-run"
    uri: str                        # the folder path or runs:/<id>/sae
    log10_rates: list[float] | None = None
    run_id: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    dataset: str | None = None
    training_tokens: int | None = None
    context_size: int | None = None


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names -> dtype, shape, offsets)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 0 < n <= MAX_HEADER:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise SAEFormatError(f"{path} is not a readable safetensors file: {e}") from e
    header.pop("__metadata__", None)
    return header


def _floats(raw: bytes, dtype: str):
    """The values of a safetensors float tensor's bytes as a numpy array (bf16 widened)."""
    import numpy as np

    values = np.frombuffer(raw, FLOAT_DTYPES[dtype])
    return (values.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else values


def _tensor_chunks(path: Path, info: Mapping[str, Any]) -> Iterator[Any]:
    """The values of one float tensor of the safetensors file ``path``, a chunk at a time."""
    try:
        start, end = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise SAEFormatError(f"{path} is not a readable safetensors file: a tensor has no "
                             "valid data_offsets") from None
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n + start)
        left = end - start
        while left > 0:
            want = min(left, CHUNK_BYTES)
            raw = f.read(want)
            if len(raw) < want:
                raise SAEFormatError(f"{path} ends before the data of its tensors; the file is "
                                     "truncated")
            left -= want
            yield _floats(raw, info["dtype"])


def check_finite_tensors(path: Path, header: Mapping[str, Any], doing: str = "register") -> None:
    """Refuse a weights file with a NaN or infinite value in any floating-point tensor, naming
    the file and the tensor (read in chunks: memory stays small for any size)."""
    import numpy as np

    for name, info in header.items():
        if info.get("dtype") not in FLOAT_DTYPES:
            continue
        nan = inf = 0
        for values in _tensor_chunks(path, info):
            nan += int(np.isnan(values).sum())
            inf += int(np.isinf(values).sum())
        if nan or inf:
            refuse_nonfinite(path, name, nan, inf, doing)


def read_log10_rates(path: Path, d_sae: int) -> list[float]:
    """The ``sparsity`` tensor (log10 firing rate per latent) as floats, without torch. A
    latent that never fired may be ``-inf``; NaN and ``+inf`` are refused."""
    import numpy as np

    header = safetensors_header(path)
    info = header.get("sparsity") or (next(iter(header.values())) if len(header) == 1 else None)
    if info is None:
        raise SAEFormatError(f"{path} has no 'sparsity' tensor")
    shape = [int(s) for s in info["shape"]]
    if int(np.prod(shape)) != d_sae:
        raise SAEFormatError(f"{path}: sparsity has shape {shape} but d_sae is {d_sae}")
    dtype = info["dtype"]
    if dtype not in FLOAT_DTYPES:
        raise SAEFormatError(f"{path}: sparsity has unsupported dtype {dtype}")
    chunks = list(_tensor_chunks(path, info))
    values = np.concatenate(chunks).astype(np.float64) if chunks else np.zeros(0)
    bad = np.isnan(values) | (values == np.inf)
    if bad.any():
        raise SAEFormatError(f"{path}: sparsity holds {int(bad.sum())} NaN or +inf values "
                             "(a log10 firing rate is at most 0, or -inf for a latent that "
                             "never fired); refusing to register it")
    return [float(v) for v in values]


def given_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Metrics a caller passes to a registration, as floats; one that is not a finite number is
    refused (:class:`ConfigError` naming the metric), before anything is stored."""
    out = {}
    for key, value in (metrics or {}).items():
        out[str(key)] = finite_number(value, f"metrics[{key!r}]", field="metrics")
    return out


def finite_metrics(metrics: Mapping[str, Any], where: str) -> dict[str, float]:
    """Metrics read from a source (``where`` names it) without the NaN and infinite ones, each
    dropped with an :class:`InputWarning`: such a value is legitimate in MLflow, but the catalog
    keeps only finite metrics (its key-metric columns are compared and sorted)."""
    out, dropped = {}, []
    for key, value in metrics.items():
        try:
            out[key] = finite_number(value, key)
        except ConfigError:
            dropped.append(f"{key}={value!r}")
    if dropped:
        warnings.warn(InputWarning(
            f"{where}: metrics {', '.join(dropped)} are not finite numbers; not copied to the "
            "catalog"), stacklevel=3)
    return out


def read_folder(folder: str | Path, *, model: str | None = None, hook: str | None = None,
                run_tags: dict[str, str] | None = None) -> Source:
    """Check an SAE folder and describe it (nothing is written)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such directory")
    cfg_path = folder / CFG_FILE
    if not cfg_path.is_file():
        raise SAEFormatError(f"{folder} is not an SAE folder: {CFG_FILE} is missing")
    cfg = read_json_object(cfg_path)
    bad = nonfinite_in_json(cfg)
    if bad is not None:
        raise SAEFormatError(f"{cfg_path}: {bad[0]} is {bad[1]}, which JSON cannot hold; "
                             "refusing to register it")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    for key, value in (("d_in", d_in), ("d_sae", d_sae)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise SAEFormatError(f"{cfg_path}: {key} must be a positive integer; got {value!r}")
    file_arch = file_architecture(cfg, cfg_path)
    arch = ARCHITECTURE_ALIASES.get(meta.get("training_architecture") or "",
                                    ARCHITECTURE_ALIASES[file_arch])
    if file_arch == "topk":
        k = cfg.get("k")
        if not isinstance(k, int) or not 0 < k < d_sae:
            raise SAEFormatError(f"{cfg_path}: topk needs an integer k in 1..{d_sae - 1}; "
                                 f"got {k!r}")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise SAEFormatError(f"{folder} lacks {WEIGHTS_FILE}")
    header = safetensors_header(weights)
    try:
        check_shapes(file_arch, d_in, d_sae,
                     {name: t.get("shape", ()) for name, t in header.items()}, weights)
    except SAEFormatError as e:
        raise SAEFormatError(f"{e}; refusing to register it") from None
    check_finite_tensors(weights, header)
    rates = None
    files = [CFG_FILE, WEIGHTS_FILE]
    if (folder / SPARSITY_FILE).is_file():
        rates = read_log10_rates(folder / SPARSITY_FILE, d_sae)
        files.append(SPARSITY_FILE)
    tags = run_tags or {}
    model = model or meta.get("model_name") or cfg.get("model_name") or tags.get("model")
    hook = hook or meta.get("hook_name") or cfg.get("hook_name") or tags.get("hook")
    if not model:
        raise UsageError(f"{cfg_path} names no language model (metadata.model_name); pass "
                         "--model")
    if not hook:
        raise UsageError(f"{cfg_path} names no hook point (metadata.hook_name); pass --hook")
    tokens = meta.get("training_tokens") or cfg.get("training_tokens")
    context = meta.get("context_size") or cfg.get("context_size")
    return Source(folder=folder, files=files, cfg=cfg, model=str(model), hook=str(hook),
                  architecture=arch, d_in=d_in, d_sae=d_sae, kind="folder",
                  uri=str(folder.resolve()), log10_rates=rates,
                  dataset=meta.get("dataset_path") or cfg.get("dataset_path"),
                  training_tokens=int(tokens) if isinstance(tokens, (int, float)) else None,
                  context_size=int(context) if isinstance(context, int) else None)


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(float(value)) if value not in (None, "", "None") else None
    except ValueError:
        return None


def read_run(client, run_id: str, workdir: Path) -> Source:
    """Download the run's ``sae/`` artifact into ``workdir`` and describe it with the run's
    params, tags and final metrics. ``client`` is an ``mlflow.MlflowClient``."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise NotFoundError("MLflow run", run_id,
                                hint=f"tracking store {redact(client.tracking_uri)}") from None
        raise SaeRegError(f"cannot read MLflow run {run_id}: "
                         f"{redact(str(e).splitlines()[0])}") from e
    if run.info.status != "FINISHED":
        raise UsageError(f"MLflow run {run_id} is {run.info.status}; only FINISHED runs can be "
                         "registered")
    try:
        names = {a.path for a in client.list_artifacts(run_id, RUN_ARTIFACT)}
    except MlflowException as e:
        raise SaeRegError(f"cannot list artifacts of run {run_id}: "
                         f"{redact(str(e).splitlines()[0])}") from e
    if f"{RUN_ARTIFACT}/{CFG_FILE}" not in names:
        raise SAEFormatError(f"MLflow run {run_id} has no SAE folder (artifact "
                             f"{RUN_ARTIFACT}/{CFG_FILE} is missing)")
    local = Path(client.download_artifacts(run_id, RUN_ARTIFACT, str(workdir)))
    tags = dict(run.data.tags)
    src = read_folder(local, run_tags=tags)
    meta = src.cfg.get("metadata") or {}
    if meta.get("mlflow_run_id") not in (None, "", run_id):
        raise SAEFormatError(f"the SAE folder of run {run_id} says it was trained in run "
                             f"{meta['mlflow_run_id']}; refusing to mix them up")
    params = dict(run.data.params)
    src.kind, src.uri, src.run_id = "mlflow-run", f"runs:/{run_id}/{RUN_ARTIFACT}", run_id
    src.params = params
    src.metrics = {k: float(v) for k, v in run.data.metrics.items()}
    src.dataset = src.dataset or params.get("job.dataset") or None
    src.training_tokens = src.training_tokens or _int_or_none(params.get("job.tokens"))
    src.context_size = src.context_size or _int_or_none(params.get("job.context_size"))
    return src

