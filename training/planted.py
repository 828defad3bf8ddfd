"""Activations with planted features: known directions, Zipf firing rates, varied magnitudes.

A :class:`PlantedFeatures` is ``n_features`` random unit directions in ``d`` dimensions. Each
sample fires feature i independently with probability ``p_i`` proportional to
``(i + 1) ** -zipf`` (scaled so that ``mean_active`` features fire per sample on average), with
magnitude ``m_i * u`` where ``m_i`` is the feature's own scale (log-uniform in
``magnitude_range``) and ``u`` uniform in [0.5, 1.5]; a little isotropic noise is added. A
good SAE recovers the directions as decoder rows. :func:`write_planted_cache` writes samples
as an activation cache folder (the layout of :mod:`saereg.training.cache`), so ``saereg train
--from-cache`` trains on them; :func:`recovery` scores a decoder against the directions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from saereg.training.cache import FORMAT, HELDOUT, MANIFEST, _save_atomic, _write_json_atomic

HOOK = "planted"
"""The one hook name of a planted cache."""


def direction_stream(seed: int) -> int:
    """The generator seed of the planted directions of ``seed``. Never ``seed`` itself: an SAE
    of seed s starts from unit rows of ``randn(d_sae, d_in)`` drawn with seed s, so directions
    drawn the same way would be its initial decoder, row for row, and it would start at the
    answer."""
    return 1_000_003 + 7_919 * seed


@dataclass
class PlantedFeatures:
    n_features: int = 256
    d: int = 64
    mean_active: float = 2.5
    zipf: float = 1.0
    magnitude_range: tuple[float, float] = (0.5, 2.0)
    noise: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(direction_stream(self.seed))
        d = torch.randn(self.n_features, self.d, generator=g)
        self.directions = d / d.norm(dim=1, keepdim=True)
        rate = (torch.arange(self.n_features) + 1.0) ** -self.zipf
        self.rates = (rate * self.mean_active / rate.sum()).clamp(max=1.0)
        lo, hi = self.magnitude_range
        u = torch.rand(self.n_features, generator=g)
        self.scales = lo * (hi / lo) ** u

    def sample(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples [n, d] and their feature activations [n, n_features]."""
        g = torch.Generator().manual_seed(seed)
        fire = torch.rand(n, self.n_features, generator=g) < self.rates
        mags = self.scales * (0.5 + torch.rand(n, self.n_features, generator=g))
        acts = fire * mags
        x = acts @ self.directions + self.noise * torch.randn(n, self.d, generator=g)
        return x, acts


def write_planted_cache(planted: PlantedFeatures, out: str | Path, samples: int, *,
                        heldout: int = 8192, shard_tokens: int = 65536) -> Path:
    """``samples`` planted samples (and ``heldout`` more) as a complete cache folder."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=False)
    shards, done = [], 0
    while done < samples:
        n = min(shard_tokens, samples - done)
        x, _ = planted.sample(n, seed=planted.seed * 1000 + len(shards) + 1)
        name = f"shard-{len(shards):05d}.safetensors"
        _save_atomic({HOOK: x, "token_ids": torch.zeros(n, dtype=torch.long)}, folder / name,
                     {"windows": "0-0"})
        shards.append({"file": name, "tokens": n, "windows": [0, 0]})
        done += n
    held = None
    if heldout:
        x, _ = planted.sample(heldout, seed=planted.seed * 1000)
        _save_atomic({HOOK: x, "token_ids": torch.zeros(heldout, dtype=torch.long)},
                     folder / HELDOUT, {"windows": "0-0"})
        held = {"file": HELDOUT, "tokens": heldout}
    manifest = {"format": FORMAT, "model": "planted-features", "model_source": "synthetic",
                "hooks": [HOOK], "d_in": {HOOK: planted.d}, "dataset": "planted-features",
                "text_column": None, "context_size": None, "dtype": "float32",
                "target_tokens": samples, "tokens": samples, "windows": 0, "complete": True,
                "shards": shards, "heldout": held,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_json_atomic(folder / MANIFEST, manifest)
    return folder


@torch.no_grad()
def recovery(planted: PlantedFeatures, sae, n_eval: int = 8192, threshold: float = 0.9
             ) -> dict[str, float]:
    """How well ``sae`` recovered the planted features, on fresh samples: ``matched`` (share
    of directions with a decoder row at cosine > ``threshold``), ``matched_live`` (the same,
    counting only rows of latents that fire on the samples), ``explained_variance``, ``dead``
    (share of latents that never fire on the samples) and ``l0``."""
    sae = sae.eval()
    w = sae.W_dec.detach().float()
    cos = (planted.directions @ (w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)).T)
    x, _ = planted.sample(n_eval, seed=planted.seed * 1000 + 999_983)
    acts = sae.encode(x)
    x_hat = sae.decode(acts)
    ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    live = (acts > 0).any(0)
    return {"matched": float((cos.max(dim=1).values > threshold).float().mean()),
            "matched_live": float((cos[:, live].max(dim=1).values > threshold).float().mean())
            if bool(live.any()) else 0.0,
            "explained_variance": float(ev),
            "dead": float((~live).float().mean()),
            "l0": float((acts > 0).sum(-1).float().mean())}


@torch.no_grad()
def matched_by_rate(planted: PlantedFeatures, sae, threshold: float = 0.9
                    ) -> list[tuple[int, int, float, float]]:
    """The share of planted directions matched by a decoder row (cosine > ``threshold``) in
    bands of features ranked by firing rate, most frequent first (ranks [0, n/16), [n/16,
    n/8), [n/8, n/4), [n/4, n/2), [n/2, n)): (first rank, end rank, the band's mean firing
    rate per sample, matched share)."""
    w = sae.W_dec.detach().float()
    cos = planted.directions @ (w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)).T
    best = cos.max(dim=1).values
    n = planted.n_features
    edges = sorted({0, *(max(1, n // d) for d in (16, 8, 4, 2)), n})
    return [(lo, hi, float(planted.rates[lo:hi].mean()), float((best[lo:hi] > threshold)
                                                              .float().mean()))
            for lo, hi in zip(edges, edges[1:])]


@torch.no_grad()
def relu_with_encoder_of(planted: PlantedFeatures, sae, n_fit: int = 16384, n_eval: int = 8192
                         ) -> dict[str, float]:
    """A ReLU SAE built from a trained JumpReLU SAE's encoder: activations relu(pre - t) with
    its pre-activations and thresholds t, and a decoder fitted by least squares (ridge 1e-2 of
    the mean diagonal) on ``n_fit`` samples, scored on the same fresh samples as
    :func:`recovery` (``explained_variance``, ``l0``). It shows what a ReLU encoder can reach at
    the JumpReLU SAE's L0, whatever its training objective."""
    sae = sae.eval()

    def acts_of(x):
        pre = sae.pre_acts(x)
        a = torch.relu(pre - sae.threshold)
        return torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1).double()

    x_fit, _ = planted.sample(n_fit, seed=planted.seed * 1000 + 424_243)
    a = acts_of(x_fit)
    gram = a.T @ a
    ridge = 1e-2 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    dec = torch.linalg.solve(gram + ridge, a.T @ x_fit.double())
    x, _ = planted.sample(n_eval, seed=planted.seed * 1000 + 999_983)
    a = acts_of(x)
    x_hat = (a @ dec).float()
    ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    return {"explained_variance": float(ev), "l0": float((a[:, :-1] > 0).sum(-1).float().mean())}


@torch.no_grad()
def support_ev(planted: PlantedFeatures, sae, n_eval: int = 8192) -> float:
    """Explained variance with ``sae``'s own firing pattern but the best magnitudes: on the
    fresh samples of :func:`recovery` (same ``n_eval``), each reconstructed from the decoder
    rows of the latents that fire on it with coefficients fitted by least squares (b_dec kept).
    At least the SAE's own EV; what it lacks of 1 is the cost of which latents fire (missed
    features, spurious ones), and the gap to the SAE's EV is the cost of its magnitudes
    (shrinkage)."""
    sae = sae.eval()
    x, _ = planted.sample(n_eval, seed=planted.seed * 1000 + 999_983)
    fires = sae.encode(x) > 0
    xn = sae.normalize_input(x.to(sae.W_enc.dtype)).double()
    target = xn - sae.b_dec.detach().double()
    rows = sae.W_dec.detach().double()
    resid = target.clone()
    for i in range(len(x)):
        idx = fires[i].nonzero().flatten()
        if len(idx):
            coef = torch.linalg.lstsq(rows[idx].T, target[i]).solution
            resid[i] = target[i] - coef @ rows[idx]
    return float(1 - resid.pow(2).sum() / (xn - xn.mean(0)).pow(2).sum())


def fit_in_process(cfg, device: str = "cpu", callbacks=()):
    """Train ``cfg`` (a TrainConfig with ``from_cache`` set) with the job's Lightning module
    and data module, without MLflow, checkpoints or evaluation (for tests; ``callbacks`` go
    to the trainer); returns the trained :class:`saereg.training.module.SAETrainingModule`."""
    import logging

    import lightning as L

    from saereg.training.job import prepare_cache
    from saereg.training.module import ActivationDataModule, SAETrainingModule

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg, source, d_ins = prepare_cache(cfg, device)
    module = SAETrainingModule(cfg.to_dict(), d_ins)
    trainer = L.Trainer(max_steps=cfg.total_steps, max_epochs=-1, accelerator="cpu",
                        devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        num_sanity_val_steps=0, gradient_clip_val=None,
                        callbacks=list(callbacks))
    trainer.fit(module, datamodule=ActivationDataModule(None, cfg, cache=source))
    return module
