"""Nearest features by decoder cosine (within a version, or in another version of an SAE on
the same model and hook), stored once computed; and the evaluation suite run on held-out text,
stored per version and logged to MLflow."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from saereg.registry.catalog import db
from saereg.registry.catalog.feature_schema import FeatureNeighbor, VersionEval
from saereg.registry.errors import UsageError
from saereg.training.corpus import dataset_name

EVAL_EXPERIMENT = "sae-registry-eval"

_UNIT_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Unit-norm decoder rows per loaded SAE module, made on its first neighbour query: a server
that keeps an SAE loaded normalises its decoder once, not on every page."""


def _unit_decoder(sae):
    w = _UNIT_DECODERS.get(sae)
    if w is None:
        w = sae.W_dec.detach()
        w = _UNIT_DECODERS[sae] = w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return w


@dataclass(frozen=True)
class Neighbor:
    ref: str
    index: int
    cosine: float
    label: str | None


def neighbors(ref, index: int, *, other: str | None = None, k: int = 10,
              database_url: str | None = None,
              load: Callable[[str], Any] | None = None, store: bool = True) -> list[Neighbor]:
    """The ``k`` features of ``other`` (default: ``ref`` itself, excluding ``index``) whose
    decoder directions are closest in cosine to feature ``index`` of ``ref``. ``load(ref)``
    gives a version's SAE when they must be computed (default: ``load_sae``; a server passes
    the SAEs it keeps loaded). Computed neighbours are stored unless ``store`` is false (a
    server computes them from its loaded SAE rather than write on a page view)."""
    import torch

    from saereg.analysis.current import current_labels
    from saereg.analysis.stats import check_index
    from saereg.registry.api import get_version, load_sae
    from saereg.training.lm_load import model_ref

    if k < 1:
        raise UsageError(f"k must be positive, got {k}")
    info = get_version(ref, database_url=database_url)
    check_index(info, index)
    oinfo = info if other is None else get_version(other, database_url=database_url)
    if ((model_ref(oinfo.model), oinfo.hook, oinfo.d_in)
            != (model_ref(info.model), info.hook, info.d_in)):
        raise UsageError(f"{oinfo.ref} is on {oinfo.model} {oinfo.hook}, not {info.model} "
                         f"{info.hook}: decoder directions are not comparable")
    with db.session(database_url) as s:
        rows = s.scalars(select(FeatureNeighbor).where(
            FeatureNeighbor.version_id == info.id, FeatureNeighbor.feature_index == index,
            FeatureNeighbor.other_version_id == oinfo.id).order_by(FeatureNeighbor.rank)).all()
        stored = [(r.other_index, r.cosine) for r in rows]
    if len(stored) < min(k, oinfo.d_sae - (oinfo.id == info.id)):
        fetch = load or (lambda r: load_sae(r, database_url=database_url))
        w = _unit_decoder(fetch(info.ref))
        wo = w if oinfo.id == info.id else _unit_decoder(fetch(oinfo.ref))
        cos = wo @ w[index]
        if oinfo.id == info.id:
            cos[index] = -math.inf
        vals, idx = cos.topk(min(k, int(torch.isfinite(cos).sum())))
        stored = [(int(i), float(v)) for v, i in zip(vals, idx)]

        def write() -> None:
            with db.session(database_url, write=True) as s:
                for r in s.scalars(select(FeatureNeighbor).where(
                        FeatureNeighbor.version_id == info.id,
                        FeatureNeighbor.feature_index == index,
                        FeatureNeighbor.other_version_id == oinfo.id)).all():
                    s.delete(r)
                s.flush()
                s.add_all(FeatureNeighbor(version_id=info.id, feature_index=index,
                                          other_version_id=oinfo.id, rank=n + 1,
                                          other_index=i, cosine=c)
                          for n, (i, c) in enumerate(stored))

        if store:
            db.retrying(write, what="storing neighbors")
    labels = current_labels(oinfo.id, [i for i, _ in stored[:k]], database_url)
    return [Neighbor(oinfo.ref, i, c, labels.get(i)) for i, c in stored[:k]]


def evaluate(ref: str, *, dataset: str | None = None, tokens: int = 8192,
             context_size: int = 128, batch_size: int = 4, mlflow: bool = True,
             database_url: str | None = None) -> dict[str, float]:
    """Run the evaluation suite (CE-loss score, KL, explained variance, L0, dead fraction,
    shrinkage) on held-out text; store it on the version (``version_evals``) and, with
    ``mlflow``, as a run of the MLflow experiment ``sae-registry-eval``."""
    from saereg.analysis.lm import load_model
    from saereg.registry.api import get_version, load_sae
    from saereg.registry.catalog.rows import current_user
    from saereg.training.data import TokenWindows
    from saereg.training.evaluate import evaluate_saes

    if tokens < 1 or context_size < 2 or batch_size < 1:
        raise UsageError("tokens and batch_size must be positive and context_size >= 2")
    info = get_version(ref, database_url=database_url)
    sae = load_sae(info.ref, database_url=database_url)
    lm = load_model(info.model)
    if context_size > lm.context_limit:
        raise UsageError(f"context_size {context_size} exceeds the model's limit "
                         f"{lm.context_limit}")
    windows = TokenWindows(lm.tokenizer, context_size, dataset=dataset, held_out=True)
    metrics = evaluate_saes(lm, {"sae": (info.hook, sae)},
                            (ids for ids, _ in windows.batches(batch_size)), tokens)["sae"]
    if not metrics:
        raise UsageError(f"no held-out window of {context_size} tokens in "
                         f"{dataset or 'the default corpus'}; nothing stored")
    metrics = {k: float(v) for k, v in metrics.items()}
    run_id = None
    if mlflow:
        run_id = _log_mlflow(info, metrics, dataset, context_size)

    def write() -> None:
        with db.session(database_url, write=True) as s:
            s.add(VersionEval(version_id=info.id, dataset=dataset_name(dataset),
                              tokens=int(metrics["eval_tokens"]), context_size=context_size,
                              metrics=metrics, mlflow_run_id=run_id, created_by=current_user()))

    db.retrying(write, what="storing an evaluation")
    return {**metrics, "mlflow_run_id": run_id}


def _log_mlflow(info, metrics: dict[str, float], dataset: str | None, context_size: int) -> str:
    from saereg.training.tracking import Tracker

    tracker = Tracker(EVAL_EXPERIMENT)
    run_id = tracker.start_run(f"eval-{info.ref}", params={
        "dataset": dataset_name(dataset), "context_size": str(context_size)}, tags={
        "saereg.version": info.ref, "saereg.version_uid": info.uid, "model": info.model,
        "hook": info.hook})
    tracker.log_metrics(run_id, {f"eval/{k}": v for k, v in metrics.items() if math.isfinite(v)},
                        step=0)
    tracker.finish(run_id)
    return run_id
