"""Lightning modules: many SAEs trained from one activation stream.

:class:`ActivationDataModule` owns the language-model pass (an :class:`ActivationStream`);
:class:`SAETrainingModule` holds one SAE per configuration, sums their independent losses,
and keeps per-latent firing statistics (for dead latents, AuxK and the density plot). Every
SAE has its own learning rate and its own gradient clip; decoder rows are kept at unit norm
with the radial part of their gradient removed before each step.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch import nn

from registry.errors import TrainingDivergedError
from registry.sae import SAE, SAEConfig, build_sae, expected_norm_scale
from training.activations import ActivationStream, StreamDataset
from training.config import SAETrainConfig, TrainConfig
from training.losses import LossSettings, compute_loss, explained_variance, geometric_median, k_at, warmup

INIT_SAMPLE_TOKENS = 4096


class LatentStats(nn.Module):
    """Per-latent firing bookkeeping, saved in checkpoints with the SAE."""

    def __init__(self, d_sae: int):
        super().__init__()
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))
        self.register_buffer("fire_count", torch.zeros(d_sae, dtype=torch.long))
        self.register_buffer("count_tokens", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, acts: torch.Tensor, count: bool) -> None:
        fired = acts > 0
        self.tokens_since_fired += acts.shape[0]
        self.tokens_since_fired[fired.any(0)] = 0
        if count:
            self.fire_count += fired.sum(0)
            self.count_tokens += acts.shape[0]

    @torch.no_grad()
    def update_sparse(self, idx: torch.Tensor, vals: torch.Tensor, count: bool) -> None:
        """The same from the active latents [B, k] of a TopK step (each at most once a row)."""
        fired = idx[vals > 0]
        self.tokens_since_fired += idx.shape[0]
        self.tokens_since_fired[fired] = 0
        if count:
            self.fire_count.index_add_(0, fired, torch.ones_like(fired))
            self.count_tokens += idx.shape[0]

    def firing_rate(self) -> torch.Tensor:
        return self.fire_count.double() / max(int(self.count_tokens), 1)


def make_sae(spec: SAETrainConfig, d_in: int, metadata: dict[str, Any] | None = None) -> SAE:
    spec.resolve(d_in)
    cfg = SAEConfig(d_in=d_in, d_sae=spec.width(d_in), architecture=spec.architecture,
                    k=spec.k if spec.architecture in ("topk", "batchtopk", "matryoshka") else None,
                    jumprelu_init_threshold=spec.jumprelu_init_threshold,
                    jumprelu_bandwidth=spec.jumprelu_bandwidth,
                    matryoshka_widths=spec.matryoshka_widths, metadata=dict(metadata or {}))
    return build_sae(cfg, seed=spec.seed)


class SAETrainingModule(L.LightningModule):
    def __init__(self, config: dict[str, Any], d_ins: dict[str, int],
                 metadata: dict[str, dict[str, Any]] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = TrainConfig.from_dict(config)
        self.specs: dict[str, SAETrainConfig] = {s.sae_id(): s for s in self.cfg.saes}
        metadata = metadata or {}
        self.saes = nn.ModuleDict({sid: make_sae(s, d_ins[s.hook], metadata.get(sid))
                                   for sid, s in self.specs.items()})
        self.stats = nn.ModuleDict({sid: LatentStats(sae.cfg.d_sae)
                                    for sid, sae in self.saes.items()})
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.step_metrics: dict[str, dict[str, float]] = {}
        self._t0 = time.perf_counter()
        self._tokens_at_t0 = 0

    # -- initialisation from data -------------------------------------------------------------
    @torch.no_grad()
    def initialize_from(self, sample: dict[str, torch.Tensor]) -> None:
        """Normalisation scale and b_dec from the first buffer (skipped when resuming)."""
        if bool(self.initialized):
            return
        for sid, sae in self.saes.items():
            spec = self.specs[sid]
            x = sample[spec.hook][:INIT_SAMPLE_TOKENS].to(sae.W_enc.device).float()
            if not torch.isfinite(x).all():
                raise TrainingDivergedError(0, spec.hook, "activations")
            sae.norm_scale.fill_(expected_norm_scale(x))
            xn = x * sae.norm_scale
            if spec.b_dec_init == "geometric_median":
                sae.b_dec.copy_(geometric_median(xn))
            elif spec.b_dec_init == "mean":
                sae.b_dec.copy_(xn.mean(0))
        self.initialized.fill_(True)

    def on_train_start(self) -> None:
        dm = self.trainer.datamodule
        if dm is not None and not bool(self.initialized):
            self.initialize_from(dm.stream.peek(INIT_SAMPLE_TOKENS))
        self._t0 = time.perf_counter()
        self._tokens_at_t0 = int(self.tokens_seen)

    # -- schedules --------------------------------------------------------------------------
    def step_for_tokens(self, tokens: int) -> int:
        return tokens // self.cfg.batch_tokens

    def lr_factor(self, step: int) -> float:
        total = self.cfg.total_steps
        w = min(self.cfg.lr_warmup_steps, max(1, total // 10))
        if w > 0 and step < w:
            return (step + 1) / w
        decay_start = int(total * (1 - self.cfg.lr_decay_fraction))
        if step >= decay_start and total > decay_start:
            return max(0.0, (total - step) / (total - decay_start))
        return 1.0

    def configure_optimizers(self):
        groups = [{"params": list(sae.parameters()), "lr": self.specs[sid].default_lr(sae.cfg.d_in),
                   "name": sid} for sid, sae in self.saes.items()]
        # the fused kernel (CPU and CUDA) is ~5x faster than the per-tensor loop on CPU
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
                    for g in groups for p in g["params"])
        opt = torch.optim.Adam(groups, betas=self.cfg.adam_betas, fused=fused or None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.step_metrics = {}
        step = int(self.global_step)
        tokens = int(self.tokens_seen)
        log_now = (step + 1) % self.cfg.log_every == 0 or step + 1 >= self.cfg.total_steps
        count_density = tokens >= self.cfg.tokens // 2
        total = None
        for sid, sae in self.saes.items():
            spec = self.specs[sid]
            x = batch[spec.hook]
            if not torch.isfinite(x).all():
                raise TrainingDivergedError(step, spec.hook, "activations")
            if hasattr(sae, "k"):
                sae.k = k_at(tokens, spec.k, spec.k_start, spec.k_anneal_tokens)
            settings = LossSettings(
                sparsity_coefficient=warmup(tokens // x.shape[0], spec.default_sparsity(),
                                            spec.sparsity_warmup_tokens // x.shape[0]),
                aux_k_alpha=spec.aux_k_alpha, aux_k=spec.aux_k or sae.cfg.d_in // 2,
                ghost_grads=spec.ghost_grads)
            stats = self.stats[sid]
            dead = stats.tokens_since_fired >= spec.dead_tokens
            out = compute_loss(sae, x, settings, dead)
            if not torch.isfinite(out.loss):
                raise TrainingDivergedError(step, spec.hook, "loss")
            if out.acts is None:
                stats.update_sparse(out.idx, out.vals, count_density)
            else:
                stats.update(out.acts.detach(), count_density)
            if log_now:
                self.step_metrics[sid] = self._metrics(sae, x, out, dead, settings, sid)
            total = out.loss if total is None else total + out.loss
        self.tokens_seen += next(iter(batch.values())).shape[0]
        return total

    @torch.no_grad()
    def _metrics(self, sae, x, out, dead, settings, sid) -> dict[str, float]:
        x_n = sae.normalize_input(x.to(sae.W_enc.dtype))
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        m = {f"loss/{k}": float(v) for k, v in out.terms.items()}
        m.update({
            "loss/total": float(out.loss),
            "mse": float(out.terms["mse"]) / sae.cfg.d_in,
            "explained_variance": float(explained_variance(out.x_hat, x_n)),
            "l0": float(out.l0()),
            "dead_fraction": float(dead.float().mean()),
            "sparsity_coefficient": settings.sparsity_coefficient,
            "lr": self._group_lr(sid),
            "tokens_seen": float(int(self.tokens_seen) + x.shape[0]),
            "tokens_per_s": (int(self.tokens_seen) + x.shape[0] - self._tokens_at_t0) / elapsed,
        })
        if hasattr(sae, "k"):
            m["k"] = float(sae.k)
        if hasattr(sae, "threshold") and sae.threshold.ndim == 0:
            m["threshold"] = float(sae.threshold)
        return m

    def _group_lr(self, sid: str) -> float:
        opt = self.optimizers()
        opt = getattr(opt, "optimizer", opt)
        for g in opt.param_groups:
            if g.get("name") == sid:
                return float(g["lr"])
        return float("nan")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        if self.cfg.grad_clip > 0:
            for sae in self.saes.values():
                torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip)

    def on_before_optimizer_step(self, optimizer) -> None:
        for sae in self.saes.values():
            sae.remove_decoder_radial_grad()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            for sae in self.saes.values():
                sae.set_decoder_norm_to_unit()
                if sae.architecture == "jumprelu":
                    sae.threshold.clamp_(min=1e-6)


class ActivationDataModule(L.LightningDataModule):
    """Feeds the trainer from one language-model pass; its state (windows consumed) is saved
    in checkpoints so a resumed job continues the token stream instead of repeating it."""

    def __init__(self, lm, cfg: TrainConfig, cache=None):
        super().__init__()
        self.lm = lm
        self.cfg = cfg
        self.cache = cache  # a training.cache.CacheSource: read activations instead of the model
        self._skip = 0
        self._stream: ActivationStream | None = None

    def make_windows(self, skip: int):
        from training.data import TokenWindows

        return TokenWindows(self.lm.tokenizer, self.cfg.context_size, dataset=self.cfg.dataset,
                            text_column=self.cfg.text_column, skip_windows=skip)

    @property
    def stream(self) -> ActivationStream:
        if self._stream is None and self.cache is not None:
            from training.cache import CacheStream

            self._stream = CacheStream(self.cache, self.cfg.hooks,
                                       batch_tokens=self.cfg.batch_tokens,
                                       buffer_tokens=self.cfg.buffer_tokens,
                                       seed=self.cfg.seed + self._skip, skip_shards=self._skip)
        if self._stream is None:
            self._stream = ActivationStream(
                self.lm, self.cfg.hooks, self.make_windows, lm_batch_size=self.cfg.lm_batch_size,
                batch_tokens=self.cfg.batch_tokens, buffer_tokens=self.cfg.buffer_tokens,
                seed=self.cfg.seed + self._skip, skip_windows=self._skip)
        return self._stream

    def train_dataloader(self):
        return torch.utils.data.DataLoader(StreamDataset(self.stream, self.cfg.total_steps),
                                           batch_size=None, num_workers=0)

    def state_dict(self) -> dict[str, Any]:
        s = self._stream
        return {"windows_consumed": s.windows_consumed if s else self._skip,
                "tokens_harvested": s.tokens_harvested if s else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._skip = int(state.get("windows_consumed", 0))
