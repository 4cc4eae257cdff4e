"""Block-sparse causal softmax attention after MoBA (Lu et al. 2025, "Mixture of Block Attention", arXiv 2502.13189).

Keys are split into blocks of `block_size` positions. A query at position t, in block i = t // block_size, attends
  - its own block causally (keys i * block_size .. t), and
  - the `top_k` earlier blocks j < i whose mean key scores highest against it (q . mean(K_j)), per query head;
with fewer than top_k earlier blocks it attends all of them (dense causal attention). The gate is a hard top-k:
no gradient flows through the choice, only through the attention over the chosen keys (as in MoBA).

Why MoBA and not NSA (arXiv 2502.11089): NSA adds two more branches (compressed-block attention through a learned
MLP and a sliding window) and a learned gate mixing the three, i.e. new parameters and three attention passes per
layer; MoBA is parameter-free, keeps the softmax layer's projections, RoPE and GQA unchanged, and its block mask is
an exact, testable definition (dense attention under a boolean mask) that a cache can reproduce token by token from
running block-key sums. For a hybrid where 1 layer in 8 is softmax, that is the smaller, checkable step.

Three functions share one gate (`select_blocks`), so they choose the same blocks:
  - `block_sparse_attention_naive`: the reference, dense attention under the MoBA mask (O(T^2) memory);
  - `block_sparse_attention`: the fast path. Every (query, chosen block) pair is grouped by key block; per key block
    one batched matmul scores its queries against its block_size keys, merged per query with an online softmax;
    the backward recomputes the scores from the saved log-sum-exp (FlashAttention style). Work is
    T * (top_k + 1) * block_size * D per head, linear in T at a fixed block size and top_k; the gate itself costs
    T * (T / block_size) * D, 1/block_size of dense attention;
  - `block_mask`: the boolean (B, H, T, S) mask for any positions (padding, a decoding cache), with
    `add_block_sums` keeping the block mean keys by position (a cache adds each new key once).

Shapes: B batch, H query heads, Hkv key/value heads (H a multiple of Hkv), T queries, S keys, D head dim,
N key blocks, K = min(top_k, earlier blocks), R = B * H rows.
"""

from __future__ import annotations

import math

import torch


def expand_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv * n_rep, S, D): query head h reads key/value head h // n_rep."""
    if n_rep == 1:
        return x
    B, Hkv, S, D = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, S, D).reshape(B, Hkv * n_rep, S, D)


def block_means(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean key of each complete block: k (B, Hkv, T, D) -> (B, Hkv, T // block_size, D)."""
    B, Hkv, T, D = k.shape
    N = T // block_size
    return k[:, :, : N * block_size].reshape(B, Hkv, N, block_size, D).mean(dim=3)


@torch.no_grad()
def add_block_sums(sums: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None,
                   block_size: int) -> torch.Tensor:
    """Add each real key to the sum of its block, by position: sums (B, Hkv, N, D) += k (B, Hkv, T, D) at block
    positions // block_size (B, T); valid (B, T) bool, False = padding (not added), None = all real. Returns sums.
    Where rows are left-padded, blocks follow each row's own positions, so a padded row equals the unpadded one."""
    B, Hkv, T, D = k.shape
    if valid is not None:
        k = k * valid[:, None, :, None].to(k.dtype)
    index = (positions // block_size)[:, None, :, None].expand(B, Hkv, T, D)
    return sums.scatter_add_(2, index, k.to(sums.dtype))


@torch.no_grad()
def select_blocks(q: torch.Tensor, means: torch.Tensor, query_blocks: torch.Tensor, top_k: int) -> torch.Tensor:
    """The MoBA gate: for each query, the top_k blocks j < its own block by q . means[j], per query head.

    q (B, H, T, D); means (B, Hkv, N, D), the mean key of block j (only blocks before a query's own are read, and
    those are complete); query_blocks (B or 1, T), each query's own block. Returns (B, H, T, K) block indices, -1
    where a query has fewer than K earlier blocks. Ties go to the lower block index (torch.topk, sorted=True)."""
    B, H, T, D = q.shape
    Hkv, N = means.shape[1], means.shape[2]
    K = min(top_k, N)
    if K == 0:
        return torch.full((B, H, T, 0), -1, dtype=torch.long, device=q.device)
    scores = torch.matmul(q.reshape(B, Hkv, (H // Hkv) * T, D), means.transpose(-1, -2))  # (B, Hkv, n_rep*T, N)
    scores = scores.view(B, H, T, N)
    earlier = torch.arange(N, device=q.device) < query_blocks[:, None, :, None]  # (B or 1, 1, T, N)
    top, idx = scores.masked_fill(~earlier, float("-inf")).topk(K, dim=-1)  # (B, H, T, K)
    return idx.masked_fill(top == float("-inf"), -1)


def block_mask(selected: torch.Tensor, query_blocks: torch.Tensor, key_blocks: torch.Tensor) -> torch.Tensor:
    """(B, H, T, S) bool: key s is in the query's own block or in one it selected. selected (B, H, T, K) from
    `select_blocks`; query_blocks (B or 1, T); key_blocks (B or 1, S). Causality and padding are the caller's mask."""
    B, H, T, _ = selected.shape
    S = key_blocks.shape[-1]
    N = int(max(int(key_blocks.max()), int(query_blocks.max()))) + 1
    chosen = torch.zeros(B, H, T, N + 1, dtype=torch.bool, device=selected.device)  # column N: "no block"
    chosen.scatter_(-1, selected.masked_fill(selected < 0, N), True)
    own = query_blocks[:, None, :, None].expand(B, H, T, 1)
    chosen.scatter_(-1, own, True)
    return chosen.gather(-1, key_blocks[:, None, None, :].expand(B, H, T, S))


def block_sparse_attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, top_k: int,
                                 scale: float | None = None, query_chunk: int | None = None) -> torch.Tensor:
    """The reference: causal softmax attention over keys 0..T-1 under the MoBA block mask, computed densely in the
    inputs' dtype. q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, H, T, D). query_chunk: rows of queries per dense
    (B, H, chunk, T) score matrix (None: all T at once), so that a long sequence can be checked in bounded memory."""
    _check(q, k, v, block_size, top_k)
    T = q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    blocks = (torch.arange(T, device=q.device) // block_size)[None]  # (1, T)
    means = block_means(k, block_size)
    n_rep = q.shape[1] // k.shape[1]
    keys, values = expand_kv(k, n_rep), expand_kv(v, n_rep)  # (B, H, T, D)
    out = []
    for t0 in range(0, T, query_chunk or T):
        rows = slice(t0, t0 + (query_chunk or T))
        q_c, qb = q[:, :, rows], blocks[:, rows]  # (B, H, c, D), (1, c)
        causal = torch.arange(T, device=q.device) <= torch.arange(t0, t0 + q_c.shape[2], device=q.device)[:, None]
        allowed = block_mask(select_blocks(q_c, means, qb, top_k), qb, blocks) & causal  # (B, H, c, T)
        scores = torch.matmul(q_c, keys.transpose(-1, -2)) * scale  # (B, H, c, T)
        out.append(torch.matmul(scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1), values))
    return torch.cat(out, dim=2)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, top_k: int,
                           scale: float | None = None, kernel: str = "auto") -> torch.Tensor:
    """The fast path: the same result as `block_sparse_attention_naive`, computing only the chosen blocks.
    q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, H, T, D); differentiable in q, k and v.
    kernel: "fused" runs each (queries, key block) tile through PyTorch's CPU FlashAttention kernel (CPU tensors
    only), "bmm" through batched matmuls (any device); "auto" takes "fused" on CPU."""
    _check(q, k, v, block_size, top_k)
    if kernel not in ("auto", "fused", "bmm"):
        raise ValueError(f"kernel must be 'auto', 'fused' or 'bmm', got {kernel!r}")
    if kernel == "fused" and q.device.type != "cpu":
        raise ValueError(f"kernel='fused' is PyTorch's CPU FlashAttention kernel; q is on {q.device}: use 'bmm'")
    fused = kernel == "fused" or (kernel == "auto" and q.device.type == "cpu")
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    blocks = (torch.arange(T, device=q.device) // block_size)[None]  # (1, T)
    selected = select_blocks(q, block_means(k, block_size), blocks, top_k)  # (B, H, T, K)
    groups = _group_by_block(selected, block_size, T)
    return _BlockSparse.apply(q, k, v, groups, block_size, selected.shape[-1], scale, fused)


def _check(q, k, v, block_size: int, top_k: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q must be (B, H, T, D) and k, v (B, Hkv, T, D) of one shape, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share B, T and D, with H a multiple "
                         "of Hkv")
    if block_size < 1 or top_k < 0:
        raise ValueError(f"block_size must be >= 1 and top_k >= 0, got block_size={block_size}, top_k={top_k}")


def _group_by_block(selected: torch.Tensor, block_size: int, T: int) -> list[torch.Tensor]:
    """For each key block j, the (query, choice) pairs that chose it: N tensors (R, n_j) of pair indices
    p = t * K + slot into the flattened (T, K) choices, padded with T * K (a dummy pair of a dummy query T) where a
    row has fewer than n_j. A query chooses a block at most once."""
    B, H, _, K = selected.shape
    R, N, device = B * H, -(-T // block_size), selected.device
    pair_block = selected.reshape(R, T * K)
    pair_block = pair_block.masked_fill(pair_block < 0, N)  # "no block" sorts last
    order = pair_block.argsort(dim=-1, stable=True)  # (R, T*K): pair indices grouped by block
    counts = torch.zeros(R, N + 1, dtype=torch.long, device=device)
    counts.scatter_add_(1, pair_block, torch.ones_like(pair_block))  # (R, N + 1)
    starts = counts.cumsum(dim=1) - counts
    groups = []
    for j, n in enumerate(counts[:, :N].amax(dim=0).tolist()):
        slot = starts[:, j : j + 1] + torch.arange(n, device=device)  # (R, n)
        pairs = order.gather(1, slot.clamp_max(max(T * K - 1, 0)))
        groups.append(pairs.masked_fill(slot >= starts[:, j : j + 1] + counts[:, j : j + 1], T * K))
    return groups


class _BlockSparse(torch.autograd.Function):
    """Own blocks as one block-diagonal causal attention; every chosen block as an unmasked attention of the
    queries that chose it; the partial results merged per query by their log-sum-exp. Saved for backward: q, k, v,
    the output and its log-sum-exp; the backward gives each tile the final output and log-sum-exp, which makes the
    FlashAttention backward of the tile the exact gradient of the merged result."""

    @staticmethod
    def forward(ctx, q, k, v, groups, block_size, K, scale, fused):
        B, H, T, D = q.shape
        R, N = B * H, -(-T // block_size)
        qr = q.reshape(R, T, D)
        kr, vr = (expand_kv(x, H // k.shape[1]).reshape(R, T, D) for x in (k, v))  # (R, T, D)
        tiles = [_pad_blocks(x, block_size) for x in (qr, kr, vr)]  # (R * N, bs, D)
        o_own, lse_own = _tile(*tiles, True, scale, fused)
        o_own = o_own.view(R, N * block_size, D)[:, :T]  # (R, T, D)
        lse_own = lse_own.reshape(R, N * block_size)[:, :T]  # (R, T)
        q_ext = _with_dummy(qr)  # (R, T + 1, D)
        o_sel = qr.new_zeros(R, T * K + 1, D)
        lse_sel = qr.new_full((R, T * K + 1), float("-inf"))  # "no block": weight 0
        for j, pairs in enumerate(groups):
            if pairs.shape[1] == 0:  # no query chose block j
                continue
            sl = slice(j * block_size, (j + 1) * block_size)
            o_j, lse_j = _tile(_rows(q_ext, pairs // max(K, 1)), kr[:, sl], vr[:, sl], False, scale, fused)
            o_sel.scatter_(1, pairs[..., None].expand(-1, -1, D), o_j)
            lse_sel.scatter_(1, pairs, lse_j)
        lse_all = torch.cat((lse_own[..., None], lse_sel[:, : T * K].view(R, T, K)), dim=-1)  # (R, T, K + 1)
        lse = lse_all.logsumexp(dim=-1)  # (R, T)
        w = torch.exp(lse_all - lse[..., None])  # (R, T, K + 1)
        out = w[..., :1] * o_own + (w[..., 1:, None] * o_sel[:, : T * K].view(R, T, K, D)).sum(dim=2)
        ctx.save_for_backward(q, k, v, out, lse, *groups)
        ctx.block_size, ctx.K, ctx.scale, ctx.fused = block_size, K, scale, fused
        return out.view(B, H, T, D)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, *groups = ctx.saved_tensors
        bs, K, scale, fused = ctx.block_size, ctx.K, ctx.scale, ctx.fused
        B, H, T, D = q.shape
        Hkv, R, N = k.shape[1], B * H, -(-T // bs)
        qr, do = q.reshape(R, T, D), grad_out.reshape(R, T, D)
        kr, vr = (expand_kv(x, H // Hkv).reshape(R, T, D) for x in (k, v))
        # own blocks; padding queries past T have zero gradient, so they add nothing
        grads = _tile_backward(*(_pad_blocks(x, bs) for x in (do, qr, kr, vr, out)),
                               _pad_blocks(lse[..., None], bs)[..., 0], True, scale, fused)
        dq, dk, dv = (g.reshape(R, N * bs, D)[:, :T].contiguous() for g in grads)  # (R, T, D)
        dq = _with_dummy(dq)  # the dummy query's row collects nothing that is read
        q_ext, do_ext, out_ext = _with_dummy(qr), _with_dummy(do), _with_dummy(out)  # dummy: zero gradient
        lse_ext = _with_dummy(lse[..., None])[..., 0]  # (R, T + 1)
        for j, pairs in enumerate(groups):
            if pairs.shape[1] == 0:
                continue
            sl, t = slice(j * bs, (j + 1) * bs), pairs // max(K, 1)  # t (R, n) query of each pair
            dq_j, dk_j, dv_j = _tile_backward(_rows(do_ext, t), _rows(q_ext, t), kr[:, sl], vr[:, sl],
                                              _rows(out_ext, t), lse_ext.gather(1, t), False, scale, fused)
            dq.scatter_add_(1, t[..., None].expand(-1, -1, D), dq_j)
            dk[:, sl] += dk_j
            dv[:, sl] += dv_j
        dq = dq[:, :T].reshape(B, H, T, D)
        dk = dk.view(B, Hkv, H // Hkv, T, D).sum(dim=2)
        dv = dv.view(B, Hkv, H // Hkv, T, D).sum(dim=2)
        return dq, dk, dv, None, None, None, None, None


def _tile(q, k, v, causal: bool, scale: float, fused: bool):
    """softmax(q k^T * scale) v and its log-sum-exp: q (R, n, D), k/v (R, m, D) -> (R, n, D), (R, n); causal
    needs n == m."""
    if fused:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[None], k[None], v[None], 0.0, causal, scale=scale)
        return out[0], lse[0]
    s = _tile_scores(q, k, causal, scale)  # (R, n, m)
    lse = s.logsumexp(dim=-1)
    return torch.bmm(torch.exp(s - lse[..., None]), v), lse


def _tile_backward(do, q, k, v, out, lse, causal: bool, scale: float, fused: bool):
    """Gradients (dq, dk, dv) of one tile whose rows are normalised by the given (final) log-sum-exp lse (R, n)."""
    if fused:
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do[None], q[None], k[None], v[None], out[None], lse[None], 0.0, causal, scale=scale)
        return tuple(g[0] for g in grads)
    p = torch.exp(_tile_scores(q, k, causal, scale) - lse[..., None])  # (R, n, m)
    ds = p * (torch.bmm(do, v.transpose(1, 2)) - (do * out).sum(dim=-1, keepdim=True))
    return torch.bmm(ds, k) * scale, torch.bmm(ds.transpose(1, 2), q) * scale, torch.bmm(p.transpose(1, 2), do)


def _tile_scores(q, k, causal: bool, scale: float) -> torch.Tensor:
    s = torch.bmm(q * scale, k.transpose(1, 2))  # (R, n, m)
    if causal:
        n = s.shape[1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


def _pad_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(R, T, D) -> (R * N, block_size, D), zero-padded to N = ceil(T / block_size) whole blocks."""
    R, T, D = x.shape
    N = -(-T // block_size)
    if N * block_size != T:
        x = torch.cat((x, x.new_zeros(R, N * block_size - T, D)), dim=1)
    return x.reshape(R * N, block_size, D)


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (R, T + 1, D) at rows idx (R, n) -> (R, n, D)."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _with_dummy(x: torch.Tensor) -> torch.Tensor:
    """(R, T, D) -> (R, T + 1, D) with a zero row T, the target of padded group entries."""
    return torch.cat((x, x.new_zeros(x.shape[0], 1, x.shape[2])), dim=1)
