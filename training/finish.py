"""The end of a training job: the metadata each saved SAE records, then evaluation on held-out
text (or the cache's held-out rows), the SAE folders in the SAELens layout, their density plots,
and the last metrics and artifacts of each SAE's MLflow run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saereg.training.config import TrainConfig
from saereg.training.corpus import dataset_name


@dataclass
class SAEResult:
    sae_id: str
    hook: str
    architecture: str
    d_sae: int
    k: int | None
    run_id: str
    folder: Path
    metrics: dict[str, float] = field(default_factory=dict)


def sae_metadata(cfg: TrainConfig, lm, spec, run_id: str) -> dict[str, Any]:
    return {
        "model_name": lm.name,
        "hook_name": spec.hook,
        "hook_head_index": None,
        "context_size": cfg.context_size,
        "prepend_bos": True,
        "exclude_special_tokens": True,
        "dataset_path": dataset_name(cfg.dataset),
        "training_tokens": cfg.tokens,
        "mlflow_run_id": run_id,
        "seed": spec.seed,
        **({"activation_cache": str(cfg.from_cache)} if cfg.from_cache else {}),
        **(lm.sae_facts() if cfg.from_cache else {}),  # imported rows: no context, BOS, dataset
    }


def finish(cfg: TrainConfig, lm, module, tracker, runs: dict[str, str], job_dir: Path,
           progress_stream=None) -> list[SAEResult]:
    """Evaluate on held-out text, write SAE folders and plots, log them, close the runs."""
    import torch

    from saereg.registry.sae.folder import save_sae
    from saereg.training.data import TokenWindows
    from saereg.training.evaluate import evaluate_saes
    from saereg.training.tracking import density_histogram_png

    module = module.to(lm.device).eval()
    saes = {sid: (module.specs[sid].hook, sae) for sid, sae in module.saes.items()}
    metrics: dict[str, dict[str, float]] = {sid: {} for sid in saes}
    if cfg.from_cache:
        from saereg.training.cache import evaluate_from_cache

        metrics = evaluate_from_cache(lm, saes, cfg.eval_tokens)
    elif cfg.eval_tokens > 0:
        windows = TokenWindows(lm.tokenizer, cfg.context_size, dataset=cfg.dataset,
                               text_column=cfg.text_column, held_out=True)
        batches = (ids for ids, _ in windows.batches(cfg.lm_batch_size))
        metrics = evaluate_saes(lm, saes, batches, cfg.eval_tokens)
    out = []
    step = cfg.total_steps  # finish() runs only once every step is done
    cfg_file = job_dir / "config.json"
    cfg_file.write_text(json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")
    for sid, (hook, sae) in saes.items():
        rid = runs[sid]
        rate = module.stats[sid].firing_rate()
        log_sparsity = torch.log10(rate + 1e-10).float()
        folder = save_sae(sae, job_dir / "saes" / sid, log_sparsity=log_sparsity, overwrite=True)
        png = density_histogram_png(log_sparsity.numpy(), job_dir / f"{sid}-density.png",
                                    f"{sid}: feature density")
        final = {f"eval/{k}": v for k, v in metrics.get(sid, {}).items()}
        final["final/dead_fraction"] = float((rate == 0).double().mean())
        tracker.log_metrics(rid, final, step)
        tracker.log_artifacts(rid, folder, "sae")
        tracker.log_artifact(rid, png, "plots")
        tracker.log_artifact(rid, cfg_file, "config")
        tracker.finish(rid)
        out.append(SAEResult(sae_id=sid, hook=hook, architecture=sae.cfg.architecture,
                             d_sae=sae.cfg.d_sae, k=sae.cfg.k, run_id=rid, folder=folder,
                             metrics=metrics.get(sid, {})))
    return out
