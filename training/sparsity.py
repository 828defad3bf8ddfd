"""The sparsity coefficient of relu, jumprelu and gated SAEs, step by step.

A fixed coefficient (``sparsity_coefficient``, or the architecture's default) rises linearly
from zero over ``sparsity_warmup_tokens`` (default: the first 5% of the run), as in the
Anthropic and JumpReLU recipes. With ``target_l0`` an integral controller sets it instead: after
every step the coefficient is multiplied by ``exp(clip(GAIN * log(L0 / target_l0), +-MAX_STEP))``
where L0 is the step's mean number of active latents over all processes, so the coefficient
rises while the SAE is denser than the target and falls while it is sparser. The coefficient is
a buffer, so checkpoints keep it and a resumed job continues where it was; every process
computes the same value from the same all-reduced L0. The controller starts at the given
coefficient, or at a hundredth of the architecture's default (from the dense side).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from saereg.training.config import SAETrainConfig
from saereg.training.losses import warmup

GAIN = 0.03
"""Change of log(coefficient) per step per unit of log(L0 / target)."""
MAX_STEP = 0.03
"""The most log(coefficient) changes in one step (a factor of about 1.03)."""
START_FRACTION = 0.01
"""With target_l0 and no coefficient given, the controller starts at this share of the
architecture's default coefficient: from the dense side, since latents that a too-large
coefficient silences early get no gradient and stay dead."""
FLOOR = 1e-8
"""The smallest coefficient the controller goes to (so it can always rise again)."""


class SparsityControl(nn.Module):
    """One SAE's sparsity coefficient: fixed with warm-up, or driven to ``target_l0``."""

    def __init__(self, spec: SAETrainConfig, run_tokens: int):
        super().__init__()
        self.target = spec.target_l0
        self.fixed = spec.default_sparsity()
        self.warmup_tokens = spec.warmup_tokens(run_tokens)
        start = self.fixed
        if self.target is not None:
            if spec.sparsity_coefficient is None:
                start = self.fixed * START_FRACTION
            start = max(start, FLOOR)
        self.register_buffer("coefficient", torch.tensor(start, dtype=torch.float64))

    def at(self, tokens: int, batch: int) -> float:
        """The coefficient of the step that starts after ``tokens`` tokens, of ``batch`` each."""
        if self.target is not None:
            return float(self.coefficient)
        return warmup(tokens // batch, self.fixed, self.warmup_tokens // batch)

    @torch.no_grad()
    def update(self, l0: float) -> None:
        """After a step whose mean L0 (over every process) was ``l0``."""
        if self.target is None:
            return
        ratio = math.log(max(l0, 1e-3) / self.target)
        delta = max(-MAX_STEP, min(MAX_STEP, GAIN * ratio))
        self.coefficient.mul_(math.exp(delta)).clamp_(min=FLOOR)
