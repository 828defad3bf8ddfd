"""Per-latent firing bookkeeping of the SAEs a job trains: when each latent last fired (dead
latents, for AuxK and ghost grads) and how often (the density plot and sparsity file)."""

from __future__ import annotations

import torch
from torch import nn


class LatentStats(nn.Module):
    """Per-latent firing bookkeeping, saved in checkpoints with the SAE."""

    def __init__(self, d_sae: int):
        super().__init__()
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))
        self.register_buffer("fire_count", torch.zeros(d_sae, dtype=torch.long))
        self.register_buffer("count_tokens", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def fire_counts(self, out) -> torch.Tensor:
        """Tokens of one step on which each latent fired, from a LossOutput: dense activations
        [B, d_sae], or the active latents [B, k] of a TopK step (each at most once a row)."""
        if out.acts is not None:
            return (out.acts.detach() > 0).sum(0)
        fired = out.idx[out.vals > 0]
        return torch.zeros_like(self.fire_count).index_add_(0, fired, torch.ones_like(fired))

    @torch.no_grad()
    def record(self, counts: torch.Tensor, n_tokens: int, count: bool) -> None:
        """Add one step of ``n_tokens`` tokens on which latent i fired ``counts[i]`` times."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[counts > 0] = 0
        if count:
            self.fire_count += counts
            self.count_tokens += n_tokens

    def firing_rate(self) -> torch.Tensor:
        return self.fire_count.double() / max(int(self.count_tokens), 1)
