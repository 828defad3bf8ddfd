"""The SAEs of one job from the command line's comma lists: their cartesian product.

``saereg train --arch relu,jumprelu --target-l0 16,32,64`` trains six SAEs from one model pass;
each value a sweep sets is part of the SAE's id (:meth:`SAETrainConfig.sae_id`), so no two of
them collide.
"""

from __future__ import annotations

from typing import Any

from saereg.training.config import K_ARCHITECTURES, SPARSITY_ARCHITECTURES, SAETrainConfig


def sweep(hooks: list[str], architectures: list[str], ks: list[int], expansions: list[int],
          sparsity_coefficients: list[float | None] | None = None,
          target_l0s: list[float | None] | None = None, lrs: list[float | None] | None = None,
          **common: Any) -> list[SAETrainConfig]:
    """The cartesian product of hooks x architectures x k x expansion x sparsity coefficient x
    target L0 x learning rate; k only where it applies (topk, batchtopk, matryoshka), the
    coefficient and target L0 only where they do (relu, jumprelu, gated)."""
    coefs, targets, lrs = sparsity_coefficients or [None], target_l0s or [None], lrs or [None]
    out: list[SAETrainConfig] = []
    for hook in hooks:
        for arch in architectures:
            k_arch = arch in K_ARCHITECTURES
            sparse = arch in SPARSITY_ARCHITECTURES
            for k in (ks if k_arch else ks[:1]):
                for expansion in expansions:
                    for coef in (coefs if sparse else [None]):
                        for target in (targets if sparse else [None]):
                            for lr in lrs:
                                out.append(SAETrainConfig(
                                    hook=hook, architecture=arch, k=k, expansion=expansion,
                                    sparsity_coefficient=coef, target_l0=target, lr=lr,
                                    **common))
    return out
