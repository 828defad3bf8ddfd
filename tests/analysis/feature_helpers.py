"""Helpers for feature-catalog tests: SAEs registered for the tiny LLaMA."""

from __future__ import annotations

from pathlib import Path


def register_tiny_sae(model_dir, tmp_path: Path, name: str = "tiny-sae", *, d_sae: int = 96,
                      seed: int = 0, hook: str = "model.layers.1") -> str:
    """A TopK SAE (random weights) for the tiny LLaMA, registered; returns ``NAME@N``."""
    from saereg.registry.api import register_from_folder
    from saereg.registry.sae.folder import save_sae
    from saereg.registry.sae.modules import SAEConfig, build_sae

    cfg = SAEConfig(d_in=64, d_sae=d_sae, architecture="topk", k=8,
                    metadata={"model_name": str(model_dir), "hook_name": hook})
    folder = save_sae(build_sae(cfg, seed=seed), tmp_path / f"{name}-{seed}", overwrite=True)
    return register_from_folder(folder, name, model=str(model_dir), hook=hook).ref
