"""Loss terms for every architecture.

All reconstruction terms are squared errors summed over the model dimension and averaged over
tokens, in the normalised space (E||x||^2 = d_in), so auxiliary terms with a coefficient are in
the same units. Formulas:

- relu: MSE + lambda(t) * sum_i f_i ||W_dec,i|| (lambda warmed up linearly); optional ghost
  grads for dead latents (exp of their pre-activations, scaled to half the residual norm).
- topk / batchtopk / matryoshka: MSE + alpha * AuxK, where AuxK reconstructs the residual
  x - x_hat from the k_aux largest pre-activations of dead latents (alpha = 1/32).
- jumprelu: MSE + lambda(t) * L0, the L0 differentiated w.r.t. the threshold with a
  straight-through estimator (rectangle kernel of width `bandwidth`).
- gated: MSE + lambda * L1 of the gate + an auxiliary reconstruction from the gate path
  through a frozen decoder.
- relu, jumprelu, gated: + c * sum_i relu(t_i - h_i) ||W_dec,i||, the pre-activation loss
  (threshold t_i; 0 for relu and the gate), which lifts latents that do not fire toward
  firing (c: SAETrainConfig.preact_coefficient, on by default for jumprelu).
- relu, jumprelu, gated in the decoder refit (the last share of a run, see
  SAETrainConfig.decoder_refit): MSE alone, from activations the frozen encoder computes
  without gradient.
- matryoshka: the sum over nested prefixes of their reconstruction errors (Bussmann et al.
  2025), so the full width carries the same weight as a TopK SAE's error and every smaller
  prefix adds its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from saereg.registry.sae.modules import (SAE, BatchTopKSAE, GatedSAE, JumpReLUSAE, MatryoshkaSAE,
                                         TopKSAE)


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    """z * H(z - t); gradient to t through the rectangle-kernel pseudo-derivative."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = (pre > threshold).to(grad.dtype) * grad
        grad_t = -(threshold / eps) * rectangle((pre - threshold) / eps) * grad
        return grad_pre, grad_t.sum(0), None


class StepFn(torch.autograd.Function):
    """H(z - t); gradient only to t (the L0 penalty trains thresholds, not the encoder)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_t = -(1.0 / eps) * rectangle((pre - threshold) / eps) * grad
        return None, grad_t.sum(0), None


@dataclass
class LossSettings:
    """Coefficients for one SAE, resolved for the current step."""

    sparsity_coefficient: float = 0.0
    """L1 (relu, gated) or L0 (jumprelu) coefficient at this step (after warm-up)."""
    aux_k_alpha: float = 1 / 32
    aux_k: int = 256
    ghost_grads: bool = False
    preact_coefficient: float = 0.0
    """Pre-activation loss weight (relu, jumprelu, gated; see preact_loss)."""
    sparse_topk: bool = True
    """TopK SAEs: the sparse kernels of saereg.training.kernels (False: the dense reference)."""
    refit: bool = False
    """The decoder refit (see refit_loss): reconstruction only, from a frozen code."""


@dataclass
class LossOutput:
    loss: torch.Tensor
    acts: torch.Tensor | None
    """Dense [B, d_sae] activations; None from the sparse TopK path (see idx, vals)."""
    x_hat: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    idx: torch.Tensor | None = None
    """Sparse TopK path: active latents [B, k] and their values (vals)."""
    vals: torch.Tensor | None = None
    d_sae: int = 0

    def dense_acts(self) -> torch.Tensor:
        if self.acts is not None:
            return self.acts
        from saereg.training.kernels import scatter_dense

        return scatter_dense(self.idx, self.vals, self.d_sae)

    def l0(self) -> torch.Tensor:
        if self.acts is not None:
            return (self.acts > 0).sum(-1).float().mean()
        return (self.vals > 0).sum(-1).float().mean()


def sq_error(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x_hat - x).pow(2).sum(-1).mean()


def aux_k_loss(sae: SAE, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor,
               dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """Reconstruct the residual from the top-k_aux pre-activations of dead latents."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    k_aux = min(k_aux, n_dead)
    masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    values, idx = masked.topk(k_aux, dim=-1, sorted=False)
    values = values.relu()
    residual = (x - x_hat).detach()
    e_hat = torch.einsum("bk,bkd->bd", values, sae.W_dec[idx])
    loss = (e_hat - residual).pow(2).sum(-1).mean()
    return torch.nan_to_num(loss, nan=0.0)


def preact_loss(pre: torch.Tensor, threshold: torch.Tensor | float, sae: SAE) -> torch.Tensor:
    """sum_i relu(t_i - h_i) ||W_dec,i||, averaged over tokens: how far below its threshold
    t_i each latent's pre-activation h_i sits where it does not fire. Its gradient reaches
    the pre-activations only (not the thresholds, not the decoder)."""
    gap = torch.relu(threshold - pre)
    return (gap * sae.W_dec.norm(dim=1).detach()).sum(-1).mean()


def ghost_grad_loss(sae: SAE, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor,
                    dead: torch.Tensor, mse: torch.Tensor) -> torch.Tensor:
    """Ghost grads for ReLU SAEs: dead latents with exp() activations model the residual."""
    if int(dead.sum()) == 0:
        return pre.new_zeros(())
    residual = (x - x_hat).detach()
    ghost = torch.exp(pre[:, dead]) @ sae.W_dec[dead]
    scale = residual.norm(dim=-1, keepdim=True) / (2 * ghost.norm(dim=-1, keepdim=True) + 1e-8)
    ghost = ghost * scale.detach()
    ghost_mse = (ghost - residual).pow(2).sum(-1).mean()
    return (mse / (ghost_mse + 1e-8)).detach() * ghost_mse


def matryoshka_error(sae: MatryoshkaSAE, x_n: torch.Tensor, acts: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reconstruction error over nested prefixes, and the full reconstruction."""
    widths = sae.cfg.matryoshka_widths
    recon = sae.b_dec.expand_as(x_n)
    errors = []
    start = 0
    for end in widths:
        recon = recon + acts[:, start:end] @ sae.W_dec[start:end]
        errors.append(sq_error(recon, x_n))
        start = end
    return torch.stack(errors).sum(), recon


def sparse_topk_loss(sae: TopKSAE, x: torch.Tensor, s: LossSettings,
                     dead: torch.Tensor) -> LossOutput:
    """MSE + alpha * AuxK for a TopK SAE through the sparse kernels (same values and gradients
    as the dense path, see saereg.training.kernels). AuxK's top-k runs over the dead columns
    of the pre-activations already computed, and its encoder and decoder gradients go into
    the main term's own (one backward for both)."""
    from saereg.training import kernels

    if int(dead.sum()):
        x_n, pattern, vals, sel, a = kernels.topk_aux_encode(sae, x, sae.k, dead, s.aux_k)
        x_hat, e_hat = kernels.sparse_decode_with_aux(pattern, vals, sae.W_dec, sae.b_dec, sel, a)
        aux = torch.nan_to_num((e_hat - (x_n - x_hat).detach()).pow(2).sum(-1).mean(), nan=0.0)
    else:
        x_n, _, _, pattern, vals = kernels.topk_encode(sae, x, sae.k)
        x_hat = kernels.sparse_decode(pattern, vals, sae.W_dec, sae.b_dec)
        aux = x_n.new_zeros(())
    mse = sq_error(x_hat, x_n)
    return LossOutput(loss=mse + s.aux_k_alpha * aux, acts=None, x_hat=x_hat,
                      terms={"aux_k": aux, "mse": mse}, idx=pattern.idx, vals=vals.detach(),
                      d_sae=sae.cfg.d_sae)


def refit_loss(sae: SAE, x: torch.Tensor) -> LossOutput:
    """The decoder refit's loss (SAETrainConfig.decoder_refit): the squared error of the
    reconstruction from activations computed without gradient, so only W_dec learns (b_dec is
    held too: the encoder subtracts it from its input)."""
    x_n = sae.normalize_input(x.to(sae.W_enc.dtype))
    with torch.no_grad():
        acts = sae.encode(x)
    x_hat = acts.to(sae.W_dec.dtype) @ sae.W_dec + sae.b_dec.detach()
    mse = sq_error(x_hat, x_n)
    return LossOutput(loss=mse, acts=acts, x_hat=x_hat, terms={"mse": mse})


def compute_loss(sae: SAE, x: torch.Tensor, s: LossSettings, dead: torch.Tensor) -> LossOutput:
    """The training loss of ``sae`` on raw activations ``x`` [B, d_in]."""
    if s.refit:
        return refit_loss(sae, x)
    if s.sparse_topk and type(sae) is TopKSAE:
        return sparse_topk_loss(sae, x, s, dead)
    x_n = sae.normalize_input(x.to(sae.W_enc.dtype))
    terms: dict[str, torch.Tensor] = {}
    if isinstance(sae, GatedSAE):
        gate_pre, mag_pre = sae.gate_and_magnitude(x)
        acts = (gate_pre > 0).to(mag_pre.dtype) * torch.relu(mag_pre)
        x_hat = sae.decode_normalized(acts)
        mse = sq_error(x_hat, x_n)
        gate = torch.relu(gate_pre)
        l1 = (gate * sae.W_dec.norm(dim=1)).sum(-1).mean()
        aux = sq_error(gate @ sae.W_dec.detach() + sae.b_dec.detach(), x_n)
        terms.update(l1=l1, gate_aux=aux)
        loss = mse + s.sparsity_coefficient * l1 + aux
        pre = gate_pre
        if s.preact_coefficient:
            terms["preact"] = preact_loss(gate_pre, 0.0, sae)
            loss = loss + s.preact_coefficient * terms["preact"]
    else:
        pre = sae.pre_acts(x)
        if isinstance(sae, JumpReLUSAE):
            eps = sae.cfg.jumprelu_bandwidth
            acts = JumpReLUFn.apply(pre, sae.threshold, eps)
            l0 = StepFn.apply(pre, sae.threshold, eps).sum(-1).mean()
            terms["l0_penalty"] = l0
        else:
            acts = sae.activate(pre)
        if isinstance(sae, MatryoshkaSAE):
            nested, x_hat = matryoshka_error(sae, x_n, acts)
            mse = sq_error(x_hat, x_n)
            terms["matryoshka"] = nested
            loss = nested
        else:
            x_hat = sae.decode_normalized(acts)
            mse = sq_error(x_hat, x_n)
            loss = mse
        if isinstance(sae, JumpReLUSAE):
            loss = loss + s.sparsity_coefficient * terms["l0_penalty"]
            if s.preact_coefficient:
                terms["preact"] = preact_loss(pre, sae.threshold.detach(), sae)
                loss = loss + s.preact_coefficient * terms["preact"]
        elif isinstance(sae, (TopKSAE, BatchTopKSAE)):
            aux = aux_k_loss(sae, x_n, x_hat, pre, dead, s.aux_k)
            terms["aux_k"] = aux
            loss = loss + s.aux_k_alpha * aux
        else:  # relu
            l1 = (torch.relu(acts) * sae.W_dec.norm(dim=1)).sum(-1).mean()
            terms["l1"] = l1
            loss = loss + s.sparsity_coefficient * l1
            if s.preact_coefficient:
                terms["preact"] = preact_loss(pre, 0.0, sae)
                loss = loss + s.preact_coefficient * terms["preact"]
            if s.ghost_grads:
                ghost = ghost_grad_loss(sae, x_n, x_hat, pre, dead, mse)
                terms["ghost_grad"] = ghost
                loss = loss + ghost
    terms["mse"] = mse
    if isinstance(sae, BatchTopKSAE) and sae.training:
        sae.update_threshold(acts.detach())
    return LossOutput(loss=loss, acts=acts, x_hat=x_hat, terms=terms)


COMPILED_ARCHITECTURES = ("relu", "jumprelu", "gated")
"""Architectures whose loss ``--compile`` runs through torch.compile: their dense elementwise
chains fuse (12-19% faster steps on the CPU, benchmarks/RESULTS.md). TopK has its own sparse
kernels, and BatchTopK's threshold update makes the compiled step slower."""

_compiled_loss = None


def compiled_loss(n_saes: int = 1):
    """``compute_loss`` through torch.compile, made once per process. Each SAE is a guard of
    its own (one graph apiece), so the recompile limit is raised to cover ``n_saes``."""
    global _compiled_loss
    import torch._dynamo

    conf = torch._dynamo.config
    name = "recompile_limit" if hasattr(conf, "recompile_limit") else "cache_size_limit"
    setattr(conf, name, max(getattr(conf, name), 2 * n_saes))
    if _compiled_loss is None:
        _compiled_loss = torch.compile(compute_loss)
    return _compiled_loss


def explained_variance(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 over the batch."""
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0, keepdim=True)).pow(2).sum()
    return 1 - resid / total.clamp_min(1e-12)


def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld iterations, starting from the mean."""
    y = x.mean(0)
    for _ in range(iters):
        d = (x - y).norm(dim=-1).clamp_min(eps)
        w = 1 / d
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < eps * (1 + y.norm()):
            return y_new
        y = y_new
    return y


def k_at(step: int, k_target: int, k_start: int | None, anneal_steps: int) -> int:
    """k schedule: linear from k_start down (or up) to k_target over anneal_steps."""
    if not k_start or anneal_steps <= 0 or step >= anneal_steps:
        return k_target
    frac = step / anneal_steps
    return max(1, round(k_start + (k_target - k_start) * frac))


def warmup(step: int, value: float, warmup_steps: int) -> float:
    if warmup_steps <= 0:
        return value
    return value * min(1.0, (step + 1) / warmup_steps)
