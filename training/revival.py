"""Split revival: latents that carry little take over the second direction of latents that
carry two.

With one latent per feature and rare features, training settles where some latents stand
between two features (a decoder row near their mean, firing on either) while others fire on
almost nothing; AuxK and ghost grads do not move them, because a merged latent is live and a
near-dead one is not dead by any window. A round of split revival looks at each latent's own
targets on a sample of recent tokens (the token's residual plus what the latent wrote: what
the latent would reconstruct alone) and clusters them in two by direction (spherical 2-means,
weighted by the targets' energy). Where the two centroids are far apart (cosine below
``SEPARATION``), each has enough members, neither duplicates another decoder row and
splitting would explain ``MARGIN`` times the energy the latent of least use carries, that
latent is moved: the merged latent keeps the larger cluster's direction, the moved one takes
the other (decoder row and encoder column, at the merged latent's encoder norm, with its bias,
threshold and gate parameters), and both lose their Adam moments. This is the split step of the LBG
vector-quantiser design (Linde, Buzo and Gray 1980) and K-SVD's replacement of unused atoms,
with the energy of a latent's own targets as the measure.
"""

from __future__ import annotations

import bisect

import torch

from saereg.training.config import REVIVAL_SAMPLE_TOKENS as SAMPLE_TOKENS
from saereg.training.distributed import broadcast_, rank, world_size

MARGIN = 2.0
"""A split must gain this many times the energy the moved latent carries."""
SEPARATION = 0.8
"""Two clusters split a latent only where their centroids' cosine is below this."""
DUPLICATE = 0.9
"""A centroid this close (cosine) to another latent's decoder row would duplicate it: no split."""
MIN_MEMBERS = 3
"""Tokens each cluster needs in the sample."""
ITERATIONS = 6
"""2-means iterations."""
PER_TOKEN = 16
"""A token's largest activations considered (the TopK family has k; dense SAEs early in
training have many more, which would only add small targets)."""
CHUNK_ELEMENTS = 1 << 24
"""Target vectors built at once (their d_in entries each), bounding the round's memory."""
ENCODER_PARAMETERS = ("b_enc", "threshold", "b_gate", "b_mag", "r_mag")
"""Per-latent parameters a moved latent copies from the latent it splits."""


class _Targets:
    """A sample's (token, latent, activation) pairs and residuals, walked in chunks."""

    def __init__(self, sae, x: torch.Tensor):
        self.sae = sae
        self.resid, self.token, self.latent, self.act = [], [], [], []
        step = 4096
        for lo in range(0, len(x), step):
            xb = x[lo:lo + step]
            acts = sae.encode(xb)
            self.resid.append(sae.normalize_input(xb.to(sae.W_dec.dtype))
                              - sae.decode_normalized(acts))
            top, idx = acts.topk(min(PER_TOKEN, acts.shape[1]), dim=1)
            keep = top > 0
            self.token.append(torch.arange(len(xb), device=x.device)[:, None].expand_as(idx)[keep])
            self.latent.append(idx[keep])
            self.act.append(top[keep].to(sae.W_dec.dtype))

    def chunks(self):
        """(latent [P], unit target [P, d_in], energy [P]) in chunks of pairs."""
        w_dec = self.sae.W_dec
        step = max(1, CHUNK_ELEMENTS // w_dec.shape[1])
        for resid, token, latent, act in zip(self.resid, self.token, self.latent, self.act):
            for lo in range(0, len(token), step):
                j = latent[lo:lo + step]
                t = resid[token[lo:lo + step]] + act[lo:lo + step, None] * w_dec[j]
                energy = t.pow(2).sum(-1)
                yield j, t / energy.sqrt().clamp_min(1e-12)[:, None], energy


def _unit(m: torch.Tensor) -> torch.Tensor:
    return m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def plan_splits(sae, x: torch.Tensor, max_moves: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The moves of one round on sample ``x`` (raw inputs [N, d_in]): (moved latents, the
    latents they split, the direction each split latent keeps, the moved latents' direction),
    at most ``max_moves``, best gain first."""
    n, dev, dt = sae.cfg.d_sae, sae.W_dec.device, sae.W_dec.dtype
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    if max_moves <= 0 or len(x) == 0:
        return empty, empty, sae.W_dec[:0], sae.W_dec[:0]
    targets = _Targets(sae, x)
    own = _unit(sae.W_dec.detach())
    # first centroid: each latent's own row; second: its target least like that row
    low = torch.full((n,), 2.0, device=dev, dtype=dt)
    c1 = torch.zeros_like(own)
    for j, u, _ in targets.chunks():
        cos = (u * own[j]).sum(-1)
        chunk_low = torch.full_like(low, 2.0).scatter_reduce(0, j, cos, "amin")
        better = chunk_low < low
        hit = (cos == chunk_low[j]) & better[j]
        c1[j[hit]] = u[hit]
        low = torch.minimum(low, chunk_low)
    c0 = own.clone()
    for _ in range(ITERATIONS):
        s0, s1 = torch.zeros_like(own), torch.zeros_like(own)
        for j, u, e in targets.chunks():
            to1 = (u * c1[j]).sum(-1) > (u * c0[j]).sum(-1)
            s1.index_add_(0, j[to1], e[to1, None] * u[to1])
            s0.index_add_(0, j[~to1], e[~to1, None] * u[~to1])
        c0, c1 = _unit(s0), _unit(s1)
    gain = torch.zeros(n, device=dev, dtype=dt)
    use = torch.zeros(n, device=dev, dtype=dt)
    count0 = torch.zeros(n, device=dev, dtype=dt)
    count1 = torch.zeros(n, device=dev, dtype=dt)
    for j, u, e in targets.chunks():
        a0, a1, a = (u * c0[j]).sum(-1), (u * c1[j]).sum(-1), (u * own[j]).sum(-1)
        to1 = a1 > a0
        gain.index_add_(0, j, e * (torch.maximum(a0, a1).pow(2) - a.pow(2)))
        use.index_add_(0, j, e * a.pow(2))
        count1.index_add_(0, j, to1.to(dt))
        count0.index_add_(0, j, (~to1).to(dt))
    ok = ((count0 >= MIN_MEMBERS) & (count1 >= MIN_MEMBERS) & (gain > 0)
          & ((c0 * c1).sum(-1) < SEPARATION))
    ranked = torch.where(ok, gain, torch.full_like(gain, -1.0)).argsort(descending=True)
    ranked = ranked[:4 * max_moves][ok[ranked[:4 * max_moves]]]
    # neither centroid may duplicate another latent's row (the latent's own row is masked)
    mask = torch.zeros(len(ranked), n, device=dev, dtype=torch.bool)
    mask[torch.arange(len(ranked), device=dev), ranked] = True
    fresh = ((c0[ranked] @ own.T).masked_fill(mask, -1).amax(1) < DUPLICATE) & (
        (c1[ranked] @ own.T).masked_fill(mask, -1).amax(1) < DUPLICATE)
    splits = ranked[fresh].tolist()
    cheap, c = use.argsort().tolist(), 0  # the least used first
    src, tgt, taken = [], [], set()
    for t in splits[:max_moves]:
        if t in taken:
            continue
        while c < n and (cheap[c] in taken or cheap[c] == t):
            c += 1
        if c == n or not gain[t] > MARGIN * use[cheap[c]]:
            break
        src.append(cheap[c])
        tgt.append(t)
        taken.update((cheap[c], t))
        c += 1
    if not src:
        return empty, empty, sae.W_dec[:0], sae.W_dec[:0]
    src_t = torch.tensor(src, device=dev)
    tgt_t = torch.tensor(tgt, device=dev)
    first = (count0[tgt_t] >= count1[tgt_t])[:, None]
    return src_t, tgt_t, torch.where(first, c0[tgt_t], c1[tgt_t]), torch.where(first, c1[tgt_t],
                                                                               c0[tgt_t])


@torch.no_grad()
def apply_splits(sae, moved: torch.Tensor, split: torch.Tensor, keep: torch.Tensor,
                 take: torch.Tensor, optimizer=None) -> None:
    """Give latents ``split`` the directions ``keep`` and latents ``moved`` the directions
    ``take`` (decoder rows; encoder columns at the split latent's encoder norm), copy the split
    latents' per-latent encoder parameters to the moved ones, and clear both's Adam moments."""
    if not len(moved):
        return
    norm = sae.W_enc[:, split].norm(dim=0)
    sae.W_dec[split] = keep.to(sae.W_dec.dtype)
    sae.W_dec[moved] = take.to(sae.W_dec.dtype)
    sae.W_enc[:, split] = (keep * norm[:, None]).T.to(sae.W_enc.dtype)
    sae.W_enc[:, moved] = (take * norm[:, None]).T.to(sae.W_enc.dtype)
    n = sae.cfg.d_sae
    for name in ENCODER_PARAMETERS:
        p = getattr(sae, name, None)
        if isinstance(p, torch.nn.Parameter) and p.shape == (n,):
            p[moved] = p[split]
    if optimizer is not None:
        clear_moments(sae, torch.cat([moved, split]), optimizer)


def clear_moments(sae, latents: torch.Tensor, optimizer) -> None:
    """Zero Adam's moments of ``latents`` in every per-latent parameter of ``sae``."""
    n = sae.cfg.d_sae
    for name, p in sae.named_parameters():
        if name == "b_dec":  # per input dimension, not per latent
            continue
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            m = state.get(key)
            if m is None:
                continue
            if p is sae.W_enc:
                m[:, latents] = 0
            elif m.ndim >= 1 and m.shape[0] == n:
                m[latents] = 0


class Reviver:
    """The split revival rounds of one SAE in a job (SAETrainConfig.revive_until): keeps the
    inputs of the steps before each round (on rank 0), runs the round after the update of
    each of ``steps`` and sends its moves to every process, so parameters stay identical."""

    def __init__(self, steps: list[int], share: float):
        self.steps = sorted(steps)
        self.due = set(self.steps)
        self.share = share
        self.sample: list[torch.Tensor] = []
        self.moved = 0
        """Latents moved so far by this process's rounds (logged as revived_latents)."""

    def keep(self, step: int, x: torch.Tensor) -> None:
        """Keep ``x`` (one step's inputs) if a round is close enough to need it."""
        i = bisect.bisect_left(self.steps, step)
        if rank() != 0 or i == len(self.steps):
            return
        if self.steps[i] - step < -(-SAMPLE_TOKENS // max(1, len(x))):
            self.sample.append(x.detach().clone())

    @torch.no_grad()
    def run(self, step: int, sae, optimizer, stats) -> int:
        """The round due after ``step``'s update, if any: latents moved (0 when none is)."""
        if step not in self.due:
            return 0
        sample, self.sample = self.sample, []
        dev = sae.W_dec.device
        moved, split, keep, take = plan_splits(
            sae, torch.cat(sample).to(dev) if rank() == 0 and sample
            else sae.W_dec.new_zeros(0, sae.cfg.d_in), int(self.share * sae.cfg.d_sae))
        if world_size() > 1:
            m = torch.tensor([len(moved)], device=dev)
            broadcast_([m])
            if rank() != 0:
                m = int(m)
                moved = torch.zeros(m, dtype=torch.long, device=dev)
                split = torch.zeros(m, dtype=torch.long, device=dev)
                keep = sae.W_dec.new_zeros(m, sae.cfg.d_in)
                take = sae.W_dec.new_zeros(m, sae.cfg.d_in)
            broadcast_([moved, split, keep, take])
        apply_splits(sae, moved, split, keep, take, optimizer)
        stats.tokens_since_fired[moved] = 0
        self.moved += len(moved)
        return len(moved)
