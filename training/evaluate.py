"""Evaluation on held-out text: how much of the model's behaviour an SAE keeps.

For every SAE, with its reconstruction spliced into the model at its hook (at the same
non-special positions it was trained on; BOS keeps its original activation):

- ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean), where CE_zero ablates the hook
  output to zero at those positions;
- kl_div: KL(clean || spliced) of next-token distributions, mean per predicted token;
- explained_variance = 1 - sum||x - x_hat||^2 / sum||x - mean||^2, mse per element, L0,
  shrinkage (mean ||x_hat|| / ||x||) and the fraction of latents that never fired;
- explained_variance_per_token: the mean over tokens of 1 - ||x - x_hat||^2 / ||x - mean||^2
  (mean: of the batch). The global ratio above is dominated by rare tokens of massive norm
  (in SmolLM2's middle layers the first token after BOS of some windows has ~100x the median
  norm, and is reconstructed well), so it can read far higher than what typical tokens get;
  the per-token mean weighs every token alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from saereg.registry.sae.modules import SAE


class _Sums:
    def __init__(self) -> None:
        self.v: dict[str, float] = {}

    def add(self, key: str, value: float) -> None:
        self.v[key] = self.v.get(key, 0.0) + float(value)


def token_variance(x: torch.Tensor) -> torch.Tensor:
    """||x_t - mean||^2 per token, the mean taken over ``x``."""
    return (x - x.mean(0, keepdim=True)).pow(2).sum(-1)


def per_token_ev(resid: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """1 - ||x_t - x_hat_t||^2 / ||x_t - mean||^2 per token, from the squared error per token
    (``resid``) and :func:`token_variance`."""
    return 1 - resid / var.clamp_min(1e-12)


def _ce_and_logp(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor):
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return nll[valid].sum(), logp


@torch.no_grad()
def evaluate_saes(lm, saes: dict[str, tuple[str, SAE]], batches: Iterable[torch.Tensor],
                  max_tokens: int) -> dict[str, dict[str, float]]:
    """Metrics per SAE id over up to ``max_tokens`` held-out tokens."""
    from saereg.training.lm import special_token_mask, splice

    hooks = list(dict.fromkeys(h for h, _ in saes.values()))
    sums = {sid: _Sums() for sid in saes}
    fired = {sid: torch.zeros(sae.cfg.d_sae, dtype=torch.bool) for sid, (_, sae) in saes.items()}
    base = _Sums()
    model = lm.model
    seen = 0
    for input_ids in batches:
        if seen >= max_tokens:
            break
        ids = input_ids.to(lm.device)
        keep = ~special_token_mask(lm.tokenizer, input_ids).to(lm.device)
        valid = keep[:, 1:]
        n_pred = int(valid.sum())
        if n_pred == 0:
            continue
        captured: dict[str, torch.Tensor] = {}

        def recorder(hook):
            def fn(out):
                captured[hook] = out.detach()
                return out
            return fn

        with contextlib.ExitStack() as stack:
            for h in hooks:
                stack.enter_context(splice(lm, h, recorder(h)))
            clean_logits = model(input_ids=ids).logits
        ce_clean, logp_clean = _ce_and_logp(clean_logits, ids, valid)
        base.add("ce_clean", ce_clean)
        base.add("n_pred", n_pred)
        zero_ce = {}
        for h in hooks:
            def zero(out):
                out = out.clone()
                out[keep] = 0
                return out
            with splice(lm, h, zero):
                zero_ce[h], _ = _ce_and_logp(model(input_ids=ids).logits, ids, valid)
        for sid, (hook, sae) in saes.items():
            x = captured[hook][keep].float()
            acts = sae.encode(x)
            x_hat = sae.decode(acts)

            def replace(out, x_hat=x_hat):
                out = out.clone()
                out[keep] = x_hat.to(out.dtype)
                return out
            with splice(lm, hook, replace):
                logits = model(input_ids=ids).logits
            ce_sae, logp = _ce_and_logp(logits, ids, valid)
            kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1)[valid].sum()
            s = sums[sid]
            s.add("ce_sae", ce_sae)
            s.add("ce_zero", zero_ce[hook])
            s.add("kl", kl)
            x64 = x.double()
            resid = (x64 - x_hat.double()).pow(2).sum(-1)
            s.add("resid", resid.sum())
            s.add("sum_sq", x64.pow(2).sum())
            s.add("ev_tokens", per_token_ev(resid, token_variance(x64)).sum())
            s.add("n", x.shape[0])
            s.add("l0", (acts > 0).sum())
            s.add("shrink", (x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-8)).sum())
            s.v.setdefault("sum_x", torch.zeros(x.shape[-1], dtype=torch.float64))
            s.v["sum_x"] = s.v["sum_x"] + x64.sum(0).cpu()
            fired[sid] |= (acts > 0).any(0).cpu()
        seen += n_pred
    results = {}
    n_pred = base.v.get("n_pred", 0.0)
    for sid, s in sums.items():
        v = s.v
        if not v or n_pred == 0:
            results[sid] = {}
            continue
        n = v["n"]
        mean_sq = float((v["sum_x"] / n).pow(2).sum())
        total_var = v["sum_sq"] - n * mean_sq
        ce_clean, ce_sae, ce_zero = base.v["ce_clean"] / n_pred, v["ce_sae"] / n_pred, v["ce_zero"] / n_pred
        denom = ce_zero - ce_clean
        d_in = saes[sid][1].cfg.d_in
        results[sid] = {
            "ce_loss_clean": ce_clean,
            "ce_loss_with_sae": ce_sae,
            "ce_loss_zero_ablation": ce_zero,
            "ce_loss_score": (ce_zero - ce_sae) / denom if abs(denom) > 1e-9 else float("nan"),
            "kl_div": v["kl"] / n_pred,
            "explained_variance": 1 - v["resid"] / max(total_var, 1e-12),
            "explained_variance_per_token": v["ev_tokens"] / n,
            "mse": v["resid"] / (n * d_in),
            "l0": v["l0"] / n,
            "shrinkage": v["shrink"] / n,
            "dead_fraction": float((~fired[sid]).float().mean()),
            "eval_tokens": n,
        }
    return results
