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

- AuxK (:func:`topk_aux_encode`, :func:`sparse_decode_with_aux`): the dead columns of pre are
  gathered once and the top k_aux runs over them only; its four products (e_hat, the values'
  gradient, both weight gradients) run over the dead latents only, dense [B, n_dead] products
  or embedding bags by density (:class:`AuxSelection`), and its gradients go into the main
  term's own buffers in the same backward (no second full-width gradient to sum).

The dense reference computes the same from a dense [B, d_sae] gradient (three full matrix
products instead of none). :class:`GatheredPreActs` is one autograd function for "gather these
pre-activations" (and AuxK's), so no gradient is ever dense in d_sae. Checked against the
dense path in tests/training/test_kernels.py.
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
            # the narrowest integer type that holds a latent: the stable sort's cost goes
            # with the key's width (int16 about a third of int64's time on the CPU)
            key = flat.to(torch.int16 if self.d_sae <= 2**15 else torch.int32)
            order = torch.argsort(key, stable=True)
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
    entries only. With an :class:`AuxSelection` (and its dead columns of pre, [B, n_dead]) it
    also returns the AuxK latents' pre-activations [B, k_aux], and the backward adds their
    gradient into the same buffers (no second full-width gradient to sum)."""

    @staticmethod
    def forward(ctx, x_n, b_dec, W_enc, b_enc, pattern: ActivePattern, idx, pre, x_c,
                aux: AuxSelection | None = None, pre_dead=None):
        ctx.save_for_backward(x_c, W_enc, idx)
        ctx.pattern, ctx.aux = pattern, aux
        vals = pre.gather(-1, idx).to(W_enc.dtype)
        if aux is None:
            return vals
        ctx.set_materialize_grads(False)
        return vals, pre_dead.gather(-1, aux.local).to(W_enc.dtype)

    @staticmethod
    def backward(ctx, grad, grad_aux=None):
        x_c, W_enc, idx = ctx.saved_tensors
        aux = ctx.aux if grad_aux is not None else None
        need_x, need_b_dec, need_w, need_b = ctx.needs_input_grad[:4]
        d_sae = W_enc.shape[1]
        if grad is None:
            grad = torch.zeros(idx.shape, dtype=W_enc.dtype, device=idx.device)
        grad = grad.contiguous().to(W_enc.dtype)
        g_dead = aux.encoder_grad(grad_aux.to(W_enc.dtype)) if aux is not None else None
        g_x = g_b_dec = g_w = g_b = None
        if need_w:  # W_enc^T grad = G^T x_c, one row per latent
            g_wt = ctx.pattern.t_matmul(grad, x_c.to(W_enc.dtype))
            if aux is not None:
                _add_rows(g_wt, aux.dead, aux.t_matmul(g_dead, x_c.to(W_enc.dtype)))
            g_w = g_wt.t()
        if need_b or need_b_dec:
            g_b = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device)
            g_b.index_add_(0, idx.reshape(-1), grad.reshape(-1))
            if aux is not None:
                g_b.index_add_(0, aux.dead, aux.column_sums(g_dead))
        if need_b_dec:  # x_c = x_n - b_dec: minus the tokens' sum of G W_enc^T
            g_b_dec = -(W_enc @ g_b)
        if need_x:  # G W_enc^T: row b sums grad[b, j] * W_enc[:, idx[b, j]]
            w_t = W_enc.t().contiguous()
            g_x = F.embedding_bag(idx, w_t, per_sample_weights=grad, mode="sum")
            if aux is not None:
                g_x = g_x + F.embedding_bag(aux.global_idx(), w_t, mode="sum",
                                            per_sample_weights=grad_aux.to(W_enc.dtype))
            g_x = g_x.to(x_c.dtype)
        return (g_x, g_b_dec, g_w, g_b if need_b else None, None, None, None, None, None, None)


def _add_rows(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> None:
    """dst[rows] += src for distinct rows: index_put_ (accumulating), as index_add_ on the CPU
    runs a [3686, 576] block into [36864, 576] rows tens of times slower with two threads."""
    dst.index_put_((rows,), src, accumulate=True)


class AuxSelection:
    """The AuxK latents of one step: the dead latents ``dead`` [n_dead] (ascending) and, per
    token, ``local`` [B, k_aux], the positions among them of its k_aux largest
    pre-activations. The products over them run dense over the n_dead columns when a token's
    k_aux cover enough of them (``dense``: a [B, n_dead] x [n_dead, d_in] product beats
    gathering B*k_aux rows), else as embedding bags over the sorted pattern."""

    DENSE_ABOVE = 0.1
    """k_aux / n_dead above which the dense products are used: on the CPU the embedding bags
    over B*k_aux entries and the dense products over n_dead columns cost about the same
    where a token's k_aux cover a tenth of the dead latents (benchmarks/RESULTS.md)."""

    def __init__(self, dead: torch.Tensor, local: torch.Tensor, dense: bool | None = None):
        self.dead, self.local = dead, local
        self.n_dead = dead.numel()
        self.dense = local.shape[1] > self.DENSE_ABOVE * self.n_dead if dense is None else dense
        self.pattern = ActivePattern(local, self.n_dead)

    def global_idx(self) -> torch.Tensor:
        return self.dead[self.local]

    def scatter(self, vals: torch.Tensor) -> torch.Tensor:
        """The dense [B, n_dead] matrix with vals [B, k_aux] at ``local``, zeros elsewhere."""
        return torch.zeros(vals.shape[0], self.n_dead, dtype=vals.dtype,
                           device=vals.device).scatter_(1, self.local, vals)

    def encoder_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """The pre-activations' gradient in the form the products take: dense [B, n_dead], or
        the [B, k_aux] values themselves."""
        return self.scatter(grad) if self.dense else grad

    def t_matmul(self, g: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """S^T @ dense [n_dead, n] for S [B, n_dead] given by :meth:`encoder_grad`."""
        return g.t() @ dense if self.dense else self.pattern.t_matmul(g, dense)

    def column_sums(self, g: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return g.sum(0)
        return torch.zeros(self.n_dead, dtype=g.dtype, device=g.device).index_add_(
            0, self.local.reshape(-1), g.reshape(-1))


def _bag_weights_grad(grad: torch.Tensor, W: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """<W[idx[b, j]], grad[b]> [B, k]: embedding_bag's own rule for its per-sample weights."""
    b, k = idx.shape
    flat = idx.reshape(-1)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad.to(W.dtype), W, flat, torch.arange(0, b * k, k, device=flat.device),
        torch.arange(b, device=flat.device).repeat_interleave(k), 0).view(b, k)


class SparseDecode(torch.autograd.Function):
    """sum_j vals[:, j] * W_dec[idx[:, j]]; gradients for the touched rows of W_dec and vals.
    With an :class:`AuxSelection` and its values a [B, k_aux] it also returns the AuxK
    reconstruction e_hat = sum_j a_j W_dec[dead[local_j]] (no bias): dense, (a scattered to
    [B, n_dead]) @ W_dec[dead], else an embedding bag; the backward adds its [n_dead, d_in]
    decoder gradient into the main one's rows (no second full-width gradient to sum)."""

    @staticmethod
    def forward(ctx, pattern: ActivePattern, vals, W_dec, aux: AuxSelection | None = None,
                a=None):
        ctx.pattern, ctx.aux = pattern, aux
        out = F.embedding_bag(pattern.idx, W_dec, per_sample_weights=vals.to(W_dec.dtype),
                              mode="sum")
        if aux is None:
            ctx.save_for_backward(pattern.idx, vals, W_dec)
            return out
        ctx.set_materialize_grads(False)
        a = a.to(W_dec.dtype)
        w_dead = W_dec.index_select(0, aux.dead)  # [n_dead, d_in]: stays in cache
        if aux.dense:
            a_dead = aux.scatter(a)
            e_hat = a_dead @ w_dead
        else:
            a_dead = a
            e_hat = F.embedding_bag(aux.local, w_dead, per_sample_weights=a, mode="sum")
        ctx.save_for_backward(pattern.idx, vals, W_dec, a_dead, w_dead)
        return out, e_hat

    @staticmethod
    def backward(ctx, grad, grad_e=None):
        idx, vals, W_dec, *dead_side = ctx.saved_tensors
        aux = ctx.aux if grad_e is not None else None
        if grad is None:
            grad = torch.zeros(idx.shape[0], W_dec.shape[1], dtype=W_dec.dtype,
                               device=W_dec.device)
        grad = grad.contiguous()
        g_vals = g_w = g_a = None
        if ctx.needs_input_grad[1]:
            g_vals = _bag_weights_grad(grad, W_dec, idx).to(vals.dtype)
        if aux is not None:
            a_dead, w_dead = dead_side
            grad_e = grad_e.contiguous().to(W_dec.dtype)
            if ctx.needs_input_grad[4]:  # the selected entries of grad_e @ W_dec[dead]^T
                g_a = ((grad_e @ w_dead.t()).gather(1, aux.local) if aux.dense
                       else _bag_weights_grad(grad_e, w_dead, aux.local))
        if ctx.needs_input_grad[2]:
            g_w = ctx.pattern.t_matmul(vals.to(grad.dtype), grad)
            if aux is not None:
                _add_rows(g_w, aux.dead, aux.t_matmul(a_dead, grad_e))
        return None, g_vals, g_w, None, g_a


def sparse_decode(idx: torch.Tensor | ActivePattern, vals: torch.Tensor, W_dec: torch.Tensor,
                  b_dec: torch.Tensor | None) -> torch.Tensor:
    """b_dec + sum_j vals[:, j] * W_dec[idx[:, j]] (no bias when b_dec is None)."""
    pattern = idx if isinstance(idx, ActivePattern) else ActivePattern(idx, W_dec.shape[0])
    out = SparseDecode.apply(pattern, vals, W_dec)
    return out if b_dec is None else out + b_dec


def sparse_decode_with_aux(pattern: ActivePattern, vals: torch.Tensor, W_dec: torch.Tensor,
                           b_dec: torch.Tensor | None, aux: AuxSelection, a: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(:func:`sparse_decode`, the AuxK reconstruction of ``a`` over ``aux``) in one pass."""
    out, e_hat = SparseDecode.apply(pattern, vals, W_dec, aux, a)
    return (out if b_dec is None else out + b_dec), e_hat


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


def _select(sae, x: torch.Tensor, k: int):
    """x_n, x_c detached, the pre-activations without grad (a workspace) and the top-k
    indices; under autocast (bf16-mixed) the product and the selection run in its dtype."""
    x_n = sae.normalize_input(x.to(sae.W_enc.dtype))
    kind = x_n.device.type
    dt = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x_n.dtype
    with torch.no_grad(), torch.autocast(kind, enabled=False):
        x_c = x_n - sae.b_dec if sae.cfg.apply_b_dec_to_input else x_n.detach()
        pre = workspace(x_c.shape[0], sae.cfg.d_sae, dt, x_c.device)
        torch.mm(x_c.to(dt), sae.W_enc.to(dt), out=pre).add_(sae.b_enc.to(dt))
        idx = pre.topk(k, dim=-1, sorted=False).indices
    return x_n, x_c, pre, idx


def topk_encode(sae, x: torch.Tensor, k: int):
    """(x_n, x_c detached, pre without grad, the active pattern, their relu'd values with the
    sparse backward). ``pre`` is a workspace: valid until the next call on this thread. The
    gathered values and every gradient stay in the parameters' dtype."""
    x_n, x_c, pre, idx = _select(sae, x, k)
    pattern = ActivePattern(idx, sae.cfg.d_sae)
    vals = gathered_pre_acts(sae, x_n, x_c, pattern, idx, pre).relu()
    return x_n, x_c, pre, pattern, vals


def topk_aux_encode(sae, x: torch.Tensor, k: int, dead: torch.Tensor, k_aux: int):
    """:func:`topk_encode` plus AuxK's selection over the dead latents (a bool mask [d_sae],
    at least one set): (x_n, the active pattern, their relu'd values, the
    :class:`AuxSelection` of min(k_aux, n_dead) latents per token, their relu'd values). The
    dead columns of the pre-activations already computed are gathered once and the top-k_aux
    runs over them only; one backward gives both terms' encoder gradients."""
    x_n, x_c, pre, idx = _select(sae, x, k)
    with torch.no_grad():
        dead_idx = dead.nonzero().squeeze(1)
        pre_dead = pre if dead_idx.numel() == pre.shape[1] else pre.index_select(1, dead_idx)
        local = pre_dead.topk(min(k_aux, dead_idx.numel()), dim=-1, sorted=False).indices
    pattern, aux = ActivePattern(idx, sae.cfg.d_sae), AuxSelection(dead_idx, local)
    b_dec = sae.b_dec if sae.cfg.apply_b_dec_to_input else None
    vals, a = GatheredPreActs.apply(x_n, b_dec, sae.W_enc, sae.b_enc, pattern, idx, pre, x_c,
                                    aux, pre_dead)
    return x_n, pattern, vals.relu(), aux, a.relu()


def scatter_dense(idx: torch.Tensor, vals: torch.Tensor, d_sae: int) -> torch.Tensor:
    """The dense [B, d_sae] activations (detached), for statistics and metrics."""
    return torch.zeros(idx.shape[0], d_sae, dtype=vals.dtype,
                       device=vals.device).scatter_(-1, idx, vals.detach())
