"""Sparse TopK training kernels: only the k active latents of each token cost anything after the
encoder's forward matrix product.

With x_c = x_n - b_dec (the centred, normalised input), pre = x_c W_enc + b_enc, and per token
the top-k indices idx and values v = relu(pre[idx]):

- decode as a gather: x_hat = b_dec + sum_j v_j W_dec[idx_j] (``embedding_bag``, mode "sum",
  with ``per_sample_weights``); its backward touches only the decoder rows in idx.
- encoder backward from the active latents only: with g = dL/dv scattered into a sparse
  [B, d_sae] matrix G (B*k non-zeros), dL/dW_enc = x_c^T G, dL/db_enc = column sums of G and
  dL/dx_c = G W_enc^T, all as sparse-dense products; the dense reference computes the same
  from a dense [B, d_sae] gradient (three full matrix products instead of none).

:class:`GatheredPreActs` is one autograd function for "gather these pre-activations"; AuxK uses
it as well (the dead latents' top k_aux), so no gradient is ever dense in d_sae. Checked against
the dense path in tests/training/test_kernels.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _coo_t(idx: torch.Tensor, vals: torch.Tensor, d_sae: int) -> torch.Tensor:
    """The transpose of the sparse [B, d_sae] matrix with vals at idx, as COO [d_sae, B]
    (B*k non-zeros; the sparse-dense product sums duplicates)."""
    b, k = idx.shape
    tokens = torch.arange(b, device=idx.device).repeat_interleave(k)
    return torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), tokens]), vals.reshape(-1),
                                   (d_sae, b), check_invariants=False)


class GatheredPreActs(torch.autograd.Function):
    """pre[b, idx[b, j]] for pre = x_c @ W_enc + b_enc already computed without grad; the
    backward gives W_enc, b_enc and x_c their gradients from the B*k gathered entries only."""

    @staticmethod
    def forward(ctx, x_c, W_enc, b_enc, idx, pre):
        ctx.save_for_backward(x_c, W_enc, idx)
        return pre.gather(-1, idx)

    @staticmethod
    def backward(ctx, grad):
        x_c, W_enc, idx = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        grad = grad.contiguous().to(W_enc.dtype)
        g_w = g_b = g_x = None
        if ctx.needs_input_grad[1]:  # W_enc^T grad = G^T x_c
            g_w = torch.sparse.mm(_coo_t(idx, grad, d_sae), x_c.to(W_enc.dtype).detach()).t()
        if ctx.needs_input_grad[2]:
            g_b = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device)
            g_b.index_add_(0, idx.reshape(-1), grad.reshape(-1))
        if ctx.needs_input_grad[0]:  # G W_enc^T: row b sums grad[b, j] * W_enc[:, idx[b, j]]
            g_x = F.embedding_bag(idx, W_enc.t().contiguous(), per_sample_weights=grad,
                                  mode="sum").to(x_c.dtype)
        return g_x, g_w, g_b, None, None


class SparseDecode(torch.autograd.Function):
    """sum_j vals[:, j] * W_dec[idx[:, j]]; gradients for the touched rows of W_dec and vals."""

    @staticmethod
    def forward(ctx, idx, vals, W_dec):
        ctx.save_for_backward(idx, vals, W_dec)
        return F.embedding_bag(idx, W_dec, per_sample_weights=vals.to(W_dec.dtype), mode="sum")

    @staticmethod
    def backward(ctx, grad):
        idx, vals, W_dec = ctx.saved_tensors
        grad = grad.contiguous()
        g_vals = g_w = None
        if ctx.needs_input_grad[1]:  # <W_dec[idx[b, j]], grad[b]>, by embedding_bag's own rule
            with torch.enable_grad():
                v = vals.detach().to(W_dec.dtype).requires_grad_(True)
                out = F.embedding_bag(idx, W_dec.detach(), per_sample_weights=v, mode="sum")
                (g_vals,) = torch.autograd.grad(out, v, grad)
            g_vals = g_vals.to(vals.dtype)
        if ctx.needs_input_grad[2]:
            g_w = torch.sparse.mm(_coo_t(idx, vals.to(grad.dtype), W_dec.shape[0]), grad)
        return None, g_vals, g_w


def sparse_decode(idx: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor,
                  b_dec: torch.Tensor) -> torch.Tensor:
    """b_dec + sum_j vals[:, j] * W_dec[idx[:, j]]."""
    return SparseDecode.apply(idx, vals, W_dec) + b_dec


def topk_encode(sae, x: torch.Tensor, k: int):
    """(x_c, pre without grad, top-k indices, their relu'd values with the sparse backward)."""
    x_n = sae.normalize_input(x.to(sae.W_enc.dtype))
    x_c = x_n - sae.b_dec if sae.cfg.apply_b_dec_to_input else x_n
    with torch.no_grad():
        pre = torch.addmm(sae.b_enc, x_c, sae.W_enc)
        idx = pre.topk(k, dim=-1, sorted=False).indices
    vals = GatheredPreActs.apply(x_c, sae.W_enc, sae.b_enc, idx, pre).relu()
    return x_n, x_c, pre, idx, vals


def scatter_dense(idx: torch.Tensor, vals: torch.Tensor, d_sae: int) -> torch.Tensor:
    """The dense [B, d_sae] activations (detached), for statistics and metrics."""
    return torch.zeros(idx.shape[0], d_sae, dtype=vals.dtype,
                       device=vals.device).scatter_(-1, idx, vals.detach())
