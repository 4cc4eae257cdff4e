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
  - `block_sparse_attention`: the fast path (`block_sparse_tiles`). Own blocks run as one block-diagonal causal
    attention; the (query, chosen block) pairs are grouped by key block and head into unmasked attention tiles, and
    tiles of similar size run batched, a few kernel calls in all; a query's tiles are merged by log-sum-exp, and the
    backward recomputes each tile from the final log-sum-exp (FlashAttention style). Work is
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

from minimax_gpt.ops.block_sparse_tiles import block_sparse_tiles


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
    return block_sparse_tiles(q, k, v, selected, block_size, scale, fused)


def _check(q, k, v, block_size: int, top_k: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q must be (B, H, T, D) and k, v (B, Hkv, T, D) of one shape, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share B, T and D, with H a multiple "
                         "of Hkv")
    if block_size < 1 or top_k < 0:
        raise ValueError(f"block_size must be >= 1 and top_k >= 0, got block_size={block_size}, top_k={top_k}")
