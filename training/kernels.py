"""Sparse TopK training kernels: only the k active latents of each token cost anything after the
encoder's forward matrix product.

With x_c = x_n - b_dec (the centred, normalised input), pre = x_c W_enc + b_enc, and per token
the top-k indices idx and values v = relu(pre[idx]):

- decode as a gather: x_hat = b_dec + sum_j v_j W_dec[idx_j] (``embedding_bag``, mode "sum",
  with ``per_sample_weights``); its backward touches only the decoder rows in idx.
- encoder backward from the active latents only: with g = dL/dv scattered into a sparse
  [B, d_sae] matrix G (B*k non-zeros), dL/dW_enc = x_c^T G and dL/db_enc = the column sums of
  G. The input's gradient is only needed summed over tokens (b_dec is the one parameter behind
  x_c): sum_b (G W_enc^T)[b] = W_enc dL/db_enc, a matrix-vector product.
- the two weight gradients dL/dW_enc^T = G^T x_c and dL/dW_dec = V^T dL/dx_hat have the same
  sparsity pattern (the active latents): :class:`ActivePattern` sorts it by latent once per
  step, and each is an embedding bag per latent over the rows of x_c or dL/dx_hat.
- the [B, d_sae] pre-activations are written into a workspace kept between steps on the CPU:
  the CPU allocator returns blocks that large to the system, so a fresh matrix each step would
  page-fault all of it in again, which costs about half the matrix product itself.

The dense reference computes the same from a dense [B, d_sae] gradient (three full matrix
products instead of none). :class:`GatheredPreActs` is one autograd function for "gather these
pre-activations"; AuxK uses it as well (the dead latents' top k_aux), so no gradient is ever
dense in d_sae. Checked against the dense path in tests/training/test_kernels.py.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F


class ActivePattern:
    """The active latents idx [B, k] of one step, sorted by latent once (lazily) and shared by
    every sparse product over them: row l of the [d_sae, B] transpose holds the tokens where
    latent l is active."""

    def __init__(self, idx: torch.Tensor, d_sae: int):
        self.idx = idx
        self.d_sae = d_sae
        self._sorted: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _pattern(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._sorted is None:
            b, k = self.idx.shape
            flat = self.idx.reshape(-1)
            order = torch.argsort(flat, stable=True)
            offsets = torch.zeros(self.d_sae + 1, dtype=torch.int64, device=flat.device)
            torch.cumsum(torch.bincount(flat, minlength=self.d_sae), 0, out=offsets[1:])
            self._sorted = (order, offsets, torch.div(order, k, rounding_mode="floor"))
        return self._sorted

    def t_matmul(self, vals: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """S^T @ dense [d_sae, n] for S the [B, d_sae] matrix with vals [B, k] at idx: an
        embedding bag over the rows of ``dense``, one bag per latent (empty bags give zeros),
        written straight into its output (a sparse-matrix product zero-fills and copies it)."""
        order, offsets, tokens = self._pattern()
        return F.embedding_bag(tokens, dense, offsets, mode="sum",
                               per_sample_weights=vals.reshape(-1)[order].to(dense.dtype),
                               include_last_offset=True)


class GatheredPreActs(torch.autograd.Function):
    """pre[b, idx[b, j]] for pre = (x_n - b_dec) @ W_enc + b_enc, already computed without grad
    (x_c = x_n - b_dec, detached, is passed in; b_dec is None when the input is not centred).
    The backward gives W_enc, b_enc, b_dec and x_n their gradients from the B*k gathered
    entries only."""

    @staticmethod
    def forward(ctx, x_n, b_dec, W_enc, b_enc, pattern: ActivePattern, idx, pre, x_c):
        ctx.save_for_backward(x_c, W_enc, idx)
        ctx.pattern = pattern
        return pre.gather(-1, idx).to(W_enc.dtype)

    @staticmethod
    def backward(ctx, grad):
        x_c, W_enc, idx = ctx.saved_tensors
        need_x, need_b_dec, need_w, need_b = ctx.needs_input_grad[:4]
        d_sae = W_enc.shape[1]
        grad = grad.contiguous().to(W_enc.dtype)
        g_x = g_b_dec = g_w = g_b = None
        if need_w:  # W_enc^T grad = G^T x_c
            g_w = ctx.pattern.t_matmul(grad, x_c.to(W_enc.dtype)).t()
        if need_b or need_b_dec:
            g_b = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device)
            g_b.index_add_(0, idx.reshape(-1), grad.reshape(-1))
        if need_b_dec:  # x_c = x_n - b_dec: minus the tokens' sum of G W_enc^T
            g_b_dec = -(W_enc @ g_b)
        if need_x:  # G W_enc^T: row b sums grad[b, j] * W_enc[:, idx[b, j]]
            g_x = F.embedding_bag(idx, W_enc.t().contiguous(), per_sample_weights=grad,
                                  mode="sum").to(x_c.dtype)
        return g_x, g_b_dec, g_w, g_b if need_b else None, None, None, None, None


class SparseDecode(torch.autograd.Function):
    """sum_j vals[:, j] * W_dec[idx[:, j]]; gradients for the touched rows of W_dec and vals."""

    @staticmethod
    def forward(ctx, pattern: ActivePattern, vals, W_dec):
        ctx.save_for_backward(pattern.idx, vals, W_dec)
        ctx.pattern = pattern
        return F.embedding_bag(pattern.idx, W_dec, per_sample_weights=vals.to(W_dec.dtype),
                               mode="sum")

    @staticmethod
    def backward(ctx, grad):
        idx, vals, W_dec = ctx.saved_tensors
        grad = grad.contiguous()
        g_vals = g_w = None
        if ctx.needs_input_grad[1]:  # <W_dec[idx[b, j]], grad[b]>: embedding_bag's own rule
            b, k = idx.shape
            flat = idx.reshape(-1)
            g_vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad.to(W_dec.dtype), W_dec, flat, torch.arange(0, b * k, k, device=flat.device),
                torch.arange(b, device=flat.device).repeat_interleave(k), 0).view(b, k)
            g_vals = g_vals.to(vals.dtype)
        if ctx.needs_input_grad[2]:
            g_w = ctx.pattern.t_matmul(vals.to(grad.dtype), grad)
        return None, g_vals, g_w


def sparse_decode(idx: torch.Tensor | ActivePattern, vals: torch.Tensor, W_dec: torch.Tensor,
                  b_dec: torch.Tensor | None) -> torch.Tensor:
    """b_dec + sum_j vals[:, j] * W_dec[idx[:, j]] (no bias when b_dec is None)."""
    pattern = idx if isinstance(idx, ActivePattern) else ActivePattern(idx, W_dec.shape[0])
    out = SparseDecode.apply(pattern, vals, W_dec)
    return out if b_dec is None else out + b_dec


_workspaces = threading.local()


def workspace(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised [rows, cols] matrix that lives on between calls (one per thread, dtype
    and device, grown to the largest request; its previous contents are overwritten). On CUDA
    a fresh tensor: the caching allocator already reuses its blocks."""
    if torch.device(device).type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    bufs = _workspaces.__dict__.setdefault("bufs", {})
    key = (dtype, str(device))
    buf = bufs.get(key)
    if buf is None or buf.numel() < rows * cols:
        bufs.pop(key, None)
        buf = bufs[key] = torch.empty(rows * cols, dtype=dtype, device=device)
    return buf[: rows * cols].view(rows, cols)


def release_workspaces() -> None:
    """Free this thread's workspaces (the next :func:`workspace` call allocates anew)."""
    _workspaces.__dict__.pop("bufs", None)


def gathered_pre_acts(sae, x_n: torch.Tensor, x_c: torch.Tensor, pattern: ActivePattern,
                      idx: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """pre gathered at idx [B, j], differentiable w.r.t. x_n and the SAE's parameters."""
    b_dec = sae.b_dec if sae.cfg.apply_b_dec_to_input else None
    return GatheredPreActs.apply(x_n, b_dec, sae.W_enc, sae.b_enc, pattern, idx, pre, x_c)


def topk_encode(sae, x: torch.Tensor, k: int):
    """(x_n, x_c detached, pre without grad, the active pattern, their relu'd values with the
    sparse backward). ``pre`` is a workspace: valid until the next call on this thread."""
    x_n = sae.normalize_input(x.to(sae.W_enc.dtype))
    kind = x_n.device.type
    # under autocast (bf16-mixed) the product and the selection run in its dtype; the gathered
    # values and every gradient stay in the parameters' dtype
    dt = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x_n.dtype
    with torch.no_grad(), torch.autocast(kind, enabled=False):
        x_c = x_n - sae.b_dec if sae.cfg.apply_b_dec_to_input else x_n.detach()
        pre = workspace(x_c.shape[0], sae.cfg.d_sae, dt, x_c.device)
        torch.mm(x_c.to(dt), sae.W_enc.to(dt), out=pre).add_(sae.b_enc.to(dt))
        idx = pre.topk(k, dim=-1, sorted=False).indices
    pattern = ActivePattern(idx, sae.cfg.d_sae)
    vals = gathered_pre_acts(sae, x_n, x_c, pattern, idx, pre).relu()
    return x_n, x_c, pre, pattern, vals


def scatter_dense(idx: torch.Tensor, vals: torch.Tensor, d_sae: int) -> torch.Tensor:
    """The dense [B, d_sae] activations (detached), for statistics and metrics."""
    return torch.zeros(idx.shape[0], d_sae, dtype=vals.dtype,
                       device=vals.device).scatter_(-1, idx, vals.detach())
