"""The fast path of block-sparse attention (`minimax_gpt.ops.block_sparse`): attention over chosen key blocks only.

Given each query's chosen earlier blocks, the work is cut into tiles:
  - own blocks: one block-diagonal causal attention, every block of block_size queries against its own keys;
  - chosen blocks: for each key block j, the queries (of every row) that chose it, against its block_size keys,
    unmasked (every key of an earlier block precedes the query).
Each tile returns its output and log-sum-exp; a query's tiles are merged by their log-sum-exps. The backward gives
each tile the query's final output and log-sum-exp, which makes the tile's FlashAttention backward (P = exp(S - lse),
dS = P * (dP - rowsum(dO * O))) the exact gradient of the merged result; nothing quadratic is saved.

Tensors are kept token-major, (T, R, D) with R = B * H rows, the memory layout of the projections' (B, T, H, D)
output and of PyTorch's CPU FlashAttention kernel, so that its inputs and outputs need no transposing copies.
A tile runs through that kernel ("fused", CPU) or through matmuls (any device).

Shapes: B batch, H query heads, Hkv key/value heads, T tokens, D head dim, K choices per query, R = B * H,
N = ceil(T / block_size) blocks, n queries in a tile.
"""

from __future__ import annotations

import torch


def block_sparse_tiles(q, k, v, selected: torch.Tensor, block_size: int, scale: float, fused: bool) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, Hkv, T, D), selected (B, H, T, K) from `select_blocks` (-1: none) -> (B, H, T, D)."""
    groups = _group_by_block(selected, block_size)
    return _BlockSparse.apply(q, k, v, groups, block_size, selected.shape[-1], scale, fused)


def _group_by_block(selected: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """For each key block j, the (query, choice) pairs that chose it: 2 N tensors (n_j, R), for each j the flat pair
    indices (t * K + slot) * R + r into the token-major (T, K, R) choices, then the flat query rows t * R + r into
    (T, R); padded with the dummy pair T * K * R (query row T * R) where a row has fewer than n_j pairs. A query
    chooses a block at most once."""
    B, H, T, K = selected.shape
    R, N, device = B * H, -(-T // block_size), selected.device
    pair_block = selected.reshape(R, T * K)
    pair_block = pair_block.masked_fill(pair_block < 0, N)  # "no block" sorts last
    order = pair_block.argsort(dim=-1, stable=True)  # (R, T*K): pair indices t * K + slot, grouped by block
    counts = torch.zeros(R, N + 1, dtype=torch.long, device=device)
    counts.scatter_add_(1, pair_block, torch.ones_like(pair_block))  # (R, N + 1)
    starts = counts.cumsum(dim=1) - counts
    rows = torch.arange(R, device=device)[:, None]
    groups = []
    for j, n in enumerate(counts[:, :N].amax(dim=0).tolist()):
        slot = starts[:, j : j + 1] + torch.arange(n, device=device)  # (R, n)
        pair = order.gather(1, slot.clamp_max(max(T * K - 1, 0)))  # (R, n) t * K + slot
        pad = slot >= starts[:, j : j + 1] + counts[:, j : j + 1]
        groups.append((pair * R + rows).masked_fill(pad, T * K * R).t().contiguous())  # (n, R)
        groups.append((pair // max(K, 1) * R + rows).masked_fill(pad, T * R).t().contiguous())  # (n, R)
    return groups


class _BlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, groups, block_size, K, scale, fused):
        B, H, T, D = q.shape
        R = B * H
        qt, kt, vt = _token_major(q), _token_major(k, H), _token_major(v, H)  # (T, R, D)
        o_own, lse_own = _tile(*(_blocks(x, block_size) for x in (qt, kt, vt)), True, scale, fused)
        o_own, lse_own = _unblock(o_own, T), _unblock(lse_own[..., None], T)[..., 0]  # (T, R, D), (T, R)
        o_sel = qt.new_zeros(T * K * R + 1, D)  # row T*K*R: the dummy pair
        lse_sel = qt.new_full((T * K * R + 1,), float("-inf"))  # "no block" keeps weight 0
        q_flat = qt.reshape(T * R, D)
        for j, (pairs, rows) in enumerate(zip(groups[::2], groups[1::2])):
            n = pairs.shape[0]
            if n == 0:  # no query chose block j
                continue
            rows = rows.clamp_max(T * R - 1)  # (n, R); the dummy reads any real query
            q_j = q_flat.index_select(0, rows.flatten()).view(n, R, D)
            o_j, lse_j = _tile(q_j.transpose(0, 1)[None], *_key_block(kt, vt, j, block_size), False, scale, fused)
            o_sel.index_copy_(0, pairs.flatten(), o_j[0].transpose(0, 1).reshape(n * R, D))
            lse_sel.index_copy_(0, pairs.flatten(), lse_j[0].t().reshape(n * R))
        lse_all = torch.cat((lse_own[:, None], lse_sel[: T * K * R].view(T, K, R)), dim=1)  # (T, K + 1, R)
        lse = lse_all.logsumexp(dim=1)  # (T, R)
        w = torch.exp(lse_all - lse[:, None])[..., None]  # (T, K + 1, R, 1)
        out = w[:, 0] * o_own + (w[:, 1:] * o_sel[: T * K * R].view(T, K, R, D)).sum(dim=1)  # (T, R, D)
        ctx.save_for_backward(q, k, v, out, lse, *groups)
        ctx.block_size, ctx.K, ctx.scale, ctx.fused = block_size, K, scale, fused
        return out.view(T, B, H, D).permute(1, 2, 0, 3)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, *groups = ctx.saved_tensors
        bs, K, scale, fused = ctx.block_size, ctx.K, ctx.scale, ctx.fused
        B, H, T, D = q.shape
        Hkv, R = k.shape[1], B * H
        qt, kt, vt, do = _token_major(q), _token_major(k, H), _token_major(v, H), _token_major(grad_out)
        dq, dk, dv = (_unblock(g, T) for g in _tile_backward(
            *(_blocks(x, bs) for x in (do, qt, kt, vt, out)), _blocks(lse[..., None], bs)[..., 0], True, scale, fused))
        dk, dv = (g.contiguous().view(T * R, D) for g in (dk, dv))
        dq_sel = qt.new_zeros(T * K * R + 1, D)  # per (query, choice) pair, like the forward's partial outputs
        # q, dO, O of every query side by side, plus a zero row T*R for the dummy pairs: its dO = O = 0 makes its
        # dS = 0, so it adds nothing to any gradient
        qdo = torch.cat((torch.cat((qt, do, out), dim=-1).view(T * R, 3 * D), qt.new_zeros(1, 3 * D)))
        lse_ext = torch.cat((lse.reshape(T * R), lse.new_zeros(1)))
        for j, (pairs, rows) in enumerate(zip(groups[::2], groups[1::2])):
            n = pairs.shape[0]
            if n == 0:
                continue
            rows = rows.flatten()  # (n * R,)
            q_j, do_j, o_j = (x.transpose(0, 1)[None] for x in qdo.index_select(0, rows).view(n, R, 3 * D).split(D, -1))
            lse_j = lse_ext.index_select(0, rows).view(n, R).t()[None]
            k_j, v_j = _key_block(kt, vt, j, bs)
            dq_j, dk_j, dv_j = _tile_backward(do_j, q_j, k_j, v_j, o_j, lse_j, False, scale, fused)
            dq_sel.index_copy_(0, pairs.flatten(), dq_j[0].transpose(0, 1).reshape(n * R, D))
            keys = slice(j * bs * R, min((j + 1) * bs, T) * R)
            dk[keys] += dk_j[0].transpose(0, 1).reshape(-1, D)
            dv[keys] += dv_j[0].transpose(0, 1).reshape(-1, D)
        dq = (dq + dq_sel[: T * K * R].view(T, K, R, D).sum(dim=1)).view(T, B, H, D).permute(1, 2, 0, 3)
        dk, dv = (g.view(T, B, Hkv, H // Hkv, D).sum(dim=3).permute(1, 2, 0, 3) for g in (dk, dv))
        return dq, dk, dv, None, None, None, None, None


def _token_major(x: torch.Tensor, heads: int | None = None) -> torch.Tensor:
    """(B, h, T, D) -> (T, B * heads, D), key/value heads repeated to `heads` query heads (a view where possible)."""
    B, h, T, D = x.shape
    x = x.permute(2, 0, 1, 3)  # (T, B, h, D)
    if heads is not None and heads != h:
        x = x[:, :, :, None].expand(T, B, h, heads // h, D)
    return x.reshape(T, B * (heads or h), D)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(T, R, ...) -> (N, R, block_size, ...) in place of memory, zero-padded to N whole blocks. As a tile batch:
    N batches of R heads, the kernel's (B, H, L, D) with the (B, L, H, D) memory it prefers."""
    T = x.shape[0]
    N = -(-T // block_size)
    if N * block_size != T:
        x = torch.cat((x, x.new_zeros(N * block_size - T, *x.shape[1:])))
    return x.view(N, block_size, *x.shape[1:]).transpose(1, 2)


def _unblock(x: torch.Tensor, T: int) -> torch.Tensor:
    """The inverse of `_blocks`: (N, R, block_size, ...) -> (T, R, ...)."""
    N, R, bs = x.shape[:3]
    return x.transpose(1, 2).reshape(N * bs, R, *x.shape[3:])[:T]


def _key_block(kt: torch.Tensor, vt: torch.Tensor, j: int, block_size: int):
    """Keys and values of block j as (1, R, bs, D) tiles."""
    sl = slice(j * block_size, (j + 1) * block_size)
    return kt[sl].transpose(0, 1)[None], vt[sl].transpose(0, 1)[None]


def _tile(q, k, v, causal: bool, scale: float, fused: bool):
    """softmax(q k^T * scale) v and its log-sum-exp: q (b, R, n, D), k/v (b, R, m, D) -> (b, R, n, D), (b, R, n);
    causal needs n == m."""
    if fused:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    s = _tile_scores(q, k, causal, scale)  # (b, R, n, m)
    lse = s.logsumexp(dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]), v), lse


def _tile_backward(do, q, k, v, out, lse, causal: bool, scale: float, fused: bool):
    """Gradients (dq, dk, dv) of one tile whose rows are normalised by the given (final) log-sum-exp lse (b, R, n)."""
    if fused:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, causal, scale=scale)
    p = torch.exp(_tile_scores(q, k, causal, scale) - lse[..., None])  # (b, R, n, m)
    ds = p * (torch.matmul(do, v.transpose(-1, -2)) - (do * out).sum(dim=-1, keepdim=True))
    return (torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), q) * scale,
            torch.matmul(p.transpose(-1, -2), do))


def _tile_scores(q, k, causal: bool, scale: float) -> torch.Tensor:
    s = torch.matmul(q * scale, k.transpose(-1, -2))  # (b, R, n, m)
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s
