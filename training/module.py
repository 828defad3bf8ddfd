"""Lightning modules: many SAEs trained from one activation stream.

:class:`ActivationDataModule` owns the language-model pass (an :class:`ActivationStream`);
:class:`SAETrainingModule` holds one SAE per configuration, sums their independent losses,
and keeps per-latent firing statistics (for dead latents, AuxK and the density plot). Every
SAE has its own learning rate and its own gradient clip (the encoder biases and JumpReLU
thresholds of relu, jumprelu and gated SAEs learn at a rate of their own, in the
pre-activations' units); decoder rows are kept at unit norm with the radial part of their
gradient removed before each step.

Data-parallel (DDP): every process draws ``batch_tokens / world_size`` activations of its own
share of the data; DDP averages the gradients, so the step is the one of the whole batch. The
initialisation from data is computed by rank 0 and broadcast; firing counts, the divergence
check and BatchTopK thresholds are combined over the processes every step, so parameters and
buffers stay identical everywhere and ``tokens_seen`` counts the tokens of all processes.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import lightning as L
import torch
from torch import nn

from saereg.registry.errors import TrainingDivergedError
from saereg.registry.sae.modules import SAE, SAEConfig, build_sae, expected_norm_scale
from saereg.training.activations import ActivationStream, StreamDataset
from saereg.training.config import SPARSITY_ARCHITECTURES, SAETrainConfig, TrainConfig
from saereg.training.distributed import (all_gather_objects, all_reduce_sum, broadcast_, rank,
                                         world_size)
from saereg.training.latents import LatentStats
from saereg.training.losses import (COMPILED_ARCHITECTURES, LossSettings, compiled_loss,
                                    compute_loss, explained_variance, geometric_median, k_at)
from saereg.training.regroup import regroup_optimizer
from saereg.training.revival import Reviver
from saereg.training.sparsity import SparsityControl

INIT_SAMPLE_TOKENS = 4096
DECODER_PARAMETERS = ("W_dec",)
"""What learns in the decoder refit (SAETrainConfig.decoder_refit); everything else is held."""
BIAS_PARAMETERS = ("b_enc", "b_gate", "b_mag")
"""The biases added to pre-activations; in relu, jumprelu and gated SAEs they learn at
``bias_lr`` (see SAETrainConfig.bias_lr)."""


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
        self.control = nn.ModuleDict({sid: SparsityControl(s, self.cfg.tokens)
                                      for sid, s in self.specs.items()})
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.refit_steps = {sid: s.refit_steps(self.cfg.total_steps)
                            for sid, s in self.specs.items()}
        self.revivers = {sid: Reviver(s.revival_steps(self.cfg.total_steps, self.cfg.batch_tokens,
                                                      self.cfg.tokens), s.revive_share)
                         for sid, s in self.specs.items()}
        """Split revival rounds per SAE (see revive_until)."""
        self._step = 0
        self.refitting: set[str] = set()
        """The SAEs whose current step is a decoder-refit step (set by training_step)."""
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
            if sae.architecture == "jumprelu":  # the threshold in the data's units
                rms = float(sae.pre_acts(x).pow(2).mean().sqrt())
                value = spec.jumprelu_init_threshold * rms
                if not value > 0:
                    value = spec.jumprelu_init_threshold  # degenerate sample: keep the factor
                sae.threshold.fill_(value)
                sae.cfg.jumprelu_init_threshold = value
        self.initialized.fill_(True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint written before the sparsity controller existed has no coefficient
        buffers: those resume at the value a new job starts from. One written before the
        encoder biases had an Adam group of their own is regrouped (regroup_optimizer)."""
        state = checkpoint.get("state_dict", {})
        for key, value in self.state_dict().items():
            if key.startswith("control.") and key not in state:
                state[key] = value
        regroup_optimizer(self, checkpoint)

    def on_train_start(self) -> None:
        dm = self.trainer.datamodule
        if dm is not None and not bool(self.initialized):
            self._initialize_on_rank_0(dm.stream)
        self._t0 = time.perf_counter()
        self._tokens_at_t0 = int(self.tokens_seen)

    def _initialize_on_rank_0(self, stream) -> None:
        """Rank 0 initialises from its first buffer and sends the SAEs to the other processes;
        non-finite activations stop every process (not only rank 0)."""
        failed, error = -1, None
        if rank() == 0:
            try:
                self.initialize_from(stream.peek(INIT_SAMPLE_TOKENS))
            except TrainingDivergedError as e:
                failed, error = self.cfg.hooks.index(e.hook), e
        status = torch.tensor([failed], device=self.initialized.device)
        broadcast_([status])
        if error is not None:
            raise error
        if int(status) >= 0:
            raise TrainingDivergedError(0, self.cfg.hooks[int(status)], "activations")
        broadcast_([*self.saes.state_dict().values(), self.initialized])

    # -- schedules --------------------------------------------------------------------------
    def step_for_tokens(self, tokens: int) -> int:
        return tokens // self.cfg.batch_tokens

    def lr_factor(self, step: int, total: int | None = None) -> float:
        """The schedule of a run of ``total`` steps (unset: the job's): linear warm-up, then
        constant, then a linear decay over the last lr_decay_fraction; 0 from ``total`` on."""
        total = self.cfg.total_steps if total is None else total
        if step >= total:
            return 0.0
        w = min(self.cfg.lr_warmup_steps, max(1, total // 10))
        if w > 0 and step < w:
            return (step + 1) / w
        decay_start = int(total * (1 - self.cfg.lr_decay_fraction))
        if step >= decay_start and total > decay_start:
            return max(0.0, (total - step) / (total - decay_start))
        return 1.0

    def in_refit(self, sid: str, step: int) -> bool:
        """Whether ``step`` of SAE ``sid`` refits its decoder (see decoder_refit)."""
        return step >= self.cfg.total_steps - self.refit_steps[sid]

    def group_lr_factor(self, name: str, sid: str, lr: float, step: int) -> float:
        """The schedule of Adam group ``name`` (of :meth:`param_groups`: SAE ``sid``, rate
        ``lr``). An SAE with a decoder refit runs the whole schedule over the steps before it;
        in the refit its main group (the only one with gradients then: W_dec's) goes from
        decoder_refit_lr down to 0, and its other groups stay at 0."""
        refit = self.refit_steps[sid]
        if not refit:
            return self.lr_factor(step)
        total = self.cfg.total_steps
        if step < total - refit:
            return self.lr_factor(step, total - refit)
        if name != sid:
            return 0.0
        spec = self.specs[sid]
        return spec.refit_lr_of(self.saes[sid].cfg.d_in) / lr * (total - step) / refit

    def param_groups(self) -> list[tuple[str, str, list[str], float]]:
        """Adam's groups in order: (group name, SAE id, the SAE's parameter names, lr). Each
        SAE's weights; the encoder biases of relu, jumprelu and gated SAEs (see bias_lr); the
        JumpReLU thresholds (see jumprelu_threshold_lr)."""
        groups = []
        for sid, sae in self.saes.items():
            spec, d_in = self.specs[sid], sae.cfg.d_in
            fast = BIAS_PARAMETERS if sae.architecture in SPARSITY_ARCHITECTURES else ()
            names = [name for name, _ in sae.named_parameters()]
            groups.append((sid, sid, [n for n in names if n != "threshold" and n not in fast],
                           spec.default_lr(d_in)))
            biases = [n for n in names if n in fast]
            if biases:
                groups.append((f"{sid}/biases", sid, biases, spec.bias_lr_of(d_in)))
            if "threshold" in names:
                groups.append((f"{sid}/threshold", sid, ["threshold"], spec.threshold_lr(d_in)))
        return groups

    def configure_optimizers(self):
        groups = []
        for name, sid, params, lr in self.param_groups():
            own = dict(self.saes[sid].named_parameters())
            groups.append({"params": [own[n] for n in params], "lr": lr, "name": name})
        # the fused kernel (CPU and CUDA) is ~5x faster than the per-tensor loop on CPU
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
                    for g in groups for p in g["params"])
        opt = torch.optim.Adam(groups, betas=self.cfg.adam_betas, fused=fused or None)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, [functools.partial(self.group_lr_factor, name, sid, lr)
                  for name, sid, _, lr in self.param_groups()])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.step_metrics = {}
        step = int(self.global_step)
        tokens = int(self.tokens_seen)
        n = next(iter(batch.values())).shape[0] * world_size()  # tokens in this step, all ranks
        log_now = rank() == 0 and ((step + 1) % self.cfg.log_every == 0
                                   or step + 1 >= self.cfg.total_steps)
        count_density = tokens >= self.cfg.tokens // 2
        steps: list[tuple | None] = []
        bad: list[int] = []  # per SAE: non-finite activations, non-finite loss
        self.refitting = {sid for sid in self.saes if self.in_refit(sid, step)}
        self._step = step
        for sid, sae in self.saes.items():
            spec = self.specs[sid]
            x = batch[spec.hook]
            if not torch.isfinite(x).all():
                steps.append(None)
                bad += [1, 0]
                continue
            self.revivers[sid].keep(step, x)
            if hasattr(sae, "k"):
                sae.k = k_at(tokens, spec.k, spec.k_start, spec.k_anneal_tokens)
            settings = LossSettings(
                sparsity_coefficient=self.control[sid].at(tokens, n),
                aux_k_alpha=spec.aux_k_alpha, aux_k=spec.aux_k or sae.cfg.d_in // 2,
                ghost_grads=spec.ghost_grads, preact_coefficient=spec.preact_of(),
                refit=sid in self.refitting)
            dead = self.stats[sid].tokens_since_fired >= spec.dead_window(self.cfg.tokens)
            out = self._loss_fn(spec, settings.refit)(sae, x, settings, dead)
            if settings.refit and world_size() > 1:
                # DDP reduces every parameter's gradient each step: give the held ones a zero
                out.loss = out.loss + 0.0 * sum(p.sum() for n, p in sae.named_parameters()
                                                 if n not in DECODER_PARAMETERS)
            steps.append((x, out, dead, settings))
            bad += [0, 0 if torch.isfinite(out.loss) else 1]
        counts = [self.stats[sid].fire_counts(st[1]) if st
                  else torch.zeros_like(self.stats[sid].fire_count)
                  for sid, st in zip(self.saes, steps)]
        *counts, flags = all_reduce_sum([*counts, torch.tensor(bad, device=counts[0].device)])
        self._raise_if_diverged(step, flags.tolist())
        total = None
        for (sid, sae), (x, out, dead, settings), c in zip(self.saes.items(), steps, counts):
            self.stats[sid].record(c, n, count_density)
            if sid not in self.refitting:  # a frozen code has a fixed L0
                self.control[sid].update(float(c.sum()) / n)  # the same on every process
            if log_now:
                self.step_metrics[sid] = self._metrics(sae, x, out, dead, settings, sid, n)
            total = out.loss if total is None else total + out.loss
        self._sync_thresholds()
        self.tokens_seen += n
        return total

    def _loss_fn(self, spec: SAETrainConfig, refit: bool = False):
        """compute_loss, compiled under --compile for the architectures it speeds up (ghost
        grads branch on the data, and the decoder refit has nothing to fuse: both eager)."""
        if (self.cfg.compile and spec.architecture in COMPILED_ARCHITECTURES
                and not spec.ghost_grads and not refit):
            return compiled_loss(len(self.specs))
        return compute_loss

    def _raise_if_diverged(self, step: int, flags: list[int]) -> None:
        """The first SAE with non-finite activations or loss on any process (every process
        raises the same error at the same step, so none is left waiting for the others)."""
        for i, sid in enumerate(self.saes):
            if flags[2 * i] or flags[2 * i + 1]:
                raise TrainingDivergedError(step, self.specs[sid].hook,
                                            "activations" if flags[2 * i] else "loss")

    @torch.no_grad()
    def _sync_thresholds(self) -> None:
        """BatchTopK / Matryoshka thresholds: the mean over the processes that have one."""
        saes = [sae for sae in self.saes.values() if sae.architecture in ("batchtopk", "matryoshka")]
        if world_size() == 1 or not saes:
            return
        t = torch.stack([sae.threshold.float() for sae in saes])
        have = (t >= 0).float()
        total, n = all_reduce_sum([t * have, have])
        for sae, v, k in zip(saes, total, n):
            sae.threshold.fill_(float(v / k) if k > 0 else -1.0)

    @torch.no_grad()
    def _metrics(self, sae, x, out, dead, settings, sid, n) -> dict[str, float]:
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
            "tokens_seen": float(int(self.tokens_seen) + n),
            "tokens_per_s": (int(self.tokens_seen) + n - self._tokens_at_t0) / elapsed,
        })
        if self.revivers[sid].steps:
            m["revived_latents"] = float(self.revivers[sid].moved)
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
        """Decoder rows keep unit norm: the radial part of their gradient goes. In the decoder
        refit the norms learn too (folded into the encoder after the step), and every other
        parameter loses its gradient, so Adam leaves it and its moments as they are."""
        for sid, sae in self.saes.items():
            if sid in self.refitting:
                for name, p in sae.named_parameters():
                    if name not in DECODER_PARAMETERS:
                        p.grad = None
            else:
                sae.remove_decoder_radial_grad()

    def optimizer_step(self, *args, **kwargs) -> None:
        """The update, then the constraints it must leave intact; before the callbacks of the
        step's end run, so a checkpoint holds the weights the next step starts from."""
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            for sid, sae in self.saes.items():
                if sid in self.refitting:
                    sae.fold_decoder_norms()
                else:
                    sae.set_decoder_norm_to_unit()
                if sae.architecture == "jumprelu":
                    sae.threshold.clamp_(min=1e-6)
            opt = self.optimizers()
            for sid, sae in self.saes.items():
                self.revivers[sid].run(self._step, sae, getattr(opt, "optimizer", opt),
                                       self.stats[sid])

    def on_train_end(self) -> None:
        from saereg.training.kernels import release_workspaces

        release_workspaces()  # the TopK pre-activation buffer; evaluation allocates its own


class ActivationDataModule(L.LightningDataModule):
    """Feeds the trainer from one language-model pass; its state (windows consumed) is saved
    in checkpoints so a resumed job continues the token stream instead of repeating it.

    Under DDP each process reads the windows whose number modulo world_size is its rank (or
    its block of rows of each cache shard) and draws batch_tokens / world_size per step; the
    checkpoint keeps the position of every process."""

    def __init__(self, lm, cfg: TrainConfig, cache=None):
        super().__init__()
        self.lm = lm
        self.cfg = cfg
        self.cache = cache  # a saereg.training.cache.CacheSource: read activations instead of the model
        self._skip = 0
        self._stream: ActivationStream | None = None

    def make_windows(self, skip: int):
        from saereg.training.data import TokenWindows

        return TokenWindows(self.lm.tokenizer, self.cfg.context_size, dataset=self.cfg.dataset,
                            text_column=self.cfg.text_column, skip_windows=skip, rank=rank(),
                            world_size=world_size())

    @property
    def stream(self) -> ActivationStream:
        if self._stream is not None:
            return self._stream
        batch = self.cfg.batch_tokens // world_size()  # this process's share of a step
        seed = self.cfg.seed + self._skip + 7919 * rank()
        if self.cache is not None:
            from saereg.training.cache import CacheStream

            self._stream = CacheStream(self.cache, self.cfg.hooks, batch_tokens=batch,
                                       buffer_tokens=self.cfg.buffer_tokens, seed=seed,
                                       skip_shards=self._skip, rank=rank(),
                                       world_size=world_size())
        else:
            self._stream = ActivationStream(
                self.lm, self.cfg.hooks, self.make_windows, lm_batch_size=self.cfg.lm_batch_size,
                batch_tokens=batch, buffer_tokens=self.cfg.buffer_tokens, seed=seed,
                skip_windows=self._skip)
        return self._stream

    def train_dataloader(self):
        return torch.utils.data.DataLoader(StreamDataset(self.stream, self.cfg.total_steps),
                                           batch_size=None, num_workers=0)

    def state_dict(self) -> dict[str, Any]:
        """Called on every process when a checkpoint is written (rank 0's copy is saved)."""
        s = self._stream
        state = {"windows_consumed": s.windows_consumed if s else self._skip,
                 "tokens_harvested": s.tokens_harvested if s else 0}
        if world_size() > 1:
            state["rank_windows"] = all_gather_objects(int(state["windows_consumed"]))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        positions = state.get("rank_windows")
        if positions and len(positions) == world_size():
            self._skip = int(positions[rank()])
        else:
            self._skip = int(state.get("windows_consumed", 0))
