"""Cross-entropy over a large vocabulary without materialising the logits.

    loss = chunked_cross_entropy(hidden, lm_head_weight, targets, chunk_size)
         == F.cross_entropy((hidden @ W^T).float().view(-1, V), targets.view(-1), ignore_index=-100)

The plain computation keeps the (B, T, V) logits for the backward pass, and builds their gradient of the same size:
at 200k vocabulary, batch 4 x 512 that is 1.6 GB of float32 twice over. Here the N = B * T positions are processed
`chunk_size` rows at a time, in forward and again in backward (the logits of a chunk are recomputed there), so the
largest temporary is (chunk_size, V). Only the per-row logsumexp (N,) is saved between the passes.

Precision: each chunk's logits are computed in the autocast dtype when autocast is on (as `lm_head` would be), then
in float32 (float64 for float64 inputs) for the softmax; gradients come back in the dtypes of `hidden` and `weight`,
with the weight gradient accumulated over chunks in float32 (float64 for float64 weights).
`cross_entropy_reference` is the plain computation, kept for the tests.

Shapes: B batch, T tokens, C n_embd, V vocab, N = B * T positions, K chunk_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy_reference(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                            ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The plain computation: full (B, T, V) logits, then mean cross-entropy over non-ignored targets (softmax in
    float32, or float64 for float64 inputs)."""
    logits = hidden @ lm_head_weight.T  # (B, T, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


def chunked_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int = 1024, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """hidden (B, T, C) or (N, C), lm_head_weight (V, C), targets (B, T) or (N,) -> mean cross-entropy over the
    positions whose target is not `ignore_index` (NaN when every target is ignored, as F.cross_entropy)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must match hidden {tuple(hidden.shape)} without its last dim")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight must be (vocab, {hidden.shape[-1]}), got {tuple(lm_head_weight.shape)}")
    return _ChunkedCrossEntropy.apply(hidden, lm_head_weight, targets, chunk_size, ignore_index)


def _compute_dtypes(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the matmuls, dtype of the softmax) for these inputs under the current autocast state."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        mm = torch.get_autocast_dtype(device)
    else:
        mm = torch.promote_types(hidden.dtype, weight.dtype)
    return mm, torch.promote_types(mm, torch.float32)


def _logits_buffer(h: torch.Tensor, w: torch.Tensor, K: int, acc_dtype: torch.dtype) -> torch.Tensor | None:
    """One (K, V) buffer that every chunk's logits are written into when the matmul already gives `acc_dtype`: a fresh
    (K, V) tensor per chunk costs its page faults each time on CPU (at 256 x 50k, about as much as the softmax)."""
    if w.dtype != acc_dtype:
        return None
    return torch.empty((min(K, h.shape[0]), w.shape[0]), dtype=acc_dtype, device=h.device)


def _chunk_logits(h_c: torch.Tensor, w: torch.Tensor, buf: torch.Tensor | None, acc_dtype: torch.dtype) -> torch.Tensor:
    """h_c (k, C) @ w^T -> (k, V) logits in acc_dtype, in `buf` when there is one (then valid until the next chunk)."""
    if buf is None:
        return (h_c @ w.T).to(acc_dtype)
    return torch.mm(h_c, w.T, out=buf[: h_c.shape[0]])


def _logsumexp_(x: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(x, -1) computed in place in x (K, V), which is overwritten: no (K, V) temporary."""
    m = x.amax(dim=-1, keepdim=True)  # (K, 1)
    m.masked_fill_(m.isinf(), 0.0)  # as torch.logsumexp: a row of -inf gives -inf, one holding +inf gives +inf
    return x.sub_(m).exp_().sum(dim=-1).log_().add_(m.squeeze(1))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index):
        mm_dtype, acc_dtype = _compute_dtypes(hidden, weight)
        device = hidden.device.type
        h = hidden.reshape(-1, hidden.shape[-1])  # (N, C)
        t = targets.reshape(-1)  # (N,)
        valid = t != ignore_index
        t_safe = torch.where(valid, t, 0).long()
        n_valid = valid.sum()
        lse = torch.empty(h.shape[0], dtype=acc_dtype, device=h.device)  # (N,)
        total = torch.zeros((), dtype=acc_dtype, device=h.device)
        w = weight.to(mm_dtype)
        buf = _logits_buffer(h, w, chunk_size, acc_dtype)
        with torch.autocast(device, enabled=False):
            for s in range(0, h.shape[0], chunk_size):
                logits = _chunk_logits(h[s:s + chunk_size].to(mm_dtype), w, buf, acc_dtype)  # (K, V)
                picked = logits.gather(1, t_safe[s:s + chunk_size, None]).squeeze(1)  # (K,)
                lse_c = _logsumexp_(logits)  # (K,); logits is overwritten
                total = total + ((lse_c - picked) * valid[s:s + chunk_size]).sum()
                lse[s:s + chunk_size] = lse_c
        ctx.save_for_backward(hidden, weight, t_safe, valid, lse, n_valid)
        ctx.chunk_size, ctx.mm_dtype, ctx.acc_dtype = chunk_size, mm_dtype, acc_dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, t_safe, valid, lse, n_valid = ctx.saved_tensors
        K, mm_dtype, acc_dtype = ctx.chunk_size, ctx.mm_dtype, ctx.acc_dtype
        h = hidden.reshape(-1, hidden.shape[-1])  # (N, C)
        w = weight.to(mm_dtype)
        scale = (grad_out / n_valid).to(acc_dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                             device=weight.device) if need_w else None
        buf = _logits_buffer(h, w, K, acc_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, h.shape[0], K):
                h_c = h[s:s + K].to(mm_dtype)  # (K, C)
                logits = _chunk_logits(h_c, w, buf, acc_dtype)  # (K, V), recomputed
                g = logits.sub_(lse[s:s + K, None]).exp_()  # softmax, in place
                g.scatter_add_(1, t_safe[s:s + K, None], torch.full_like(g[:, :1], -1.0))
                g = g.mul_(valid[s:s + K, None] * scale).to(mm_dtype)  # d loss / d logits, (K, V)
                if need_h:
                    grad_h[s:s + K] = (g @ w).to(h.dtype)
                if need_w:
                    if g.dtype == grad_w.dtype:
                        grad_w.addmm_(g.T, h_c)  # (V, C), accumulated without a (V, C) temporary
                    else:
                        grad_w += (g.T @ h_c).to(grad_w.dtype)
        grad_hidden = grad_h.view(hidden.shape) if need_h else None
        grad_weight = grad_w.to(weight.dtype) if need_w else None
        return grad_hidden, grad_weight, None, None, None
