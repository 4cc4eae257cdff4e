"""The "sparse" layer: MoBA block-sparse softmax attention (see `minimax_gpt.ops.block_sparse`) with the softmax
layer's projections, RoPE and grouped-query heads; only the mixing of q, k, v differs.

Blocks follow token positions (position // sparse_block_size), so a left-padded row attends exactly as unpadded.
  - a plain causal forward (no padding, no past): the fast path, which computes only the chosen blocks;
  - anything else (a decoding cache, padding, attention dropout in training, use_flash_attn=False): the same gate
    and block mask applied densely through the softmax layer's kernels. The cache keeps per-block key sums, added
    once per token, so a decoding step reads the block mean keys without revisiting past keys.

Shapes: B batch, T new tokens, S keys (past + new), H query heads, Hkv key/value heads, D head dim, N blocks.
"""

from __future__ import annotations

import logging

import torch

from minimax_gpt.config import MiniMaxConfig
from minimax_gpt.models.attention import SoftmaxAttention
from minimax_gpt.models.context import ForwardContext
from minimax_gpt.ops.block_sparse import add_block_sums, block_mask, block_sparse_attention, select_blocks

log = logging.getLogger(__name__)
_dropout_logged = False


class SparseAttention(SoftmaxAttention):
    def __init__(self, config: MiniMaxConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.block_size, self.top_k = config.sparse_block_size, config.sparse_top_k

    def _mix(self, q, k, v, ctx: ForwardContext) -> torch.Tensor:
        dropout = self.training and self.dropout > 0
        if ctx.is_causal and self.use_flash_attn and not dropout:
            return block_sparse_attention(q, k, v, self.block_size, self.top_k)  # (B, H, T, D)
        if dropout:
            _log_dropout_fallback()
        query_blocks = ctx.positions // self.block_size  # (B, T)
        key_blocks = ctx.key_positions // self.block_size  # (B, S)
        selected = select_blocks(q, self._block_means(k, ctx), query_blocks, self.top_k)  # (B, H, T, K)
        allowed = block_mask(selected, query_blocks, key_blocks)  # (B, H, T, S)
        if ctx.attn_mask is not None:
            allowed = allowed & ctx.attn_mask
        elif ctx.is_causal:
            T = q.shape[2]
            allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        return self._attend(q, k, v, allowed, False)

    def _block_means(self, k: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """(B, Hkv, N, D): the mean key of each block by position; only complete blocks are read by the gate."""
        if ctx.cache is not None:
            return ctx.cache.block_means(self.layer_idx)
        B, Hkv, S, D = k.shape
        n_blocks = int(ctx.key_positions.max()) // self.block_size + 1
        sums = k.new_zeros(B, Hkv, n_blocks, D)
        return add_block_sums(sums, k, ctx.key_positions, ctx.token_mask, self.block_size) / self.block_size


def _log_dropout_fallback() -> None:
    global _dropout_logged
    if not _dropout_logged:
        _dropout_logged = True
        log.info("sparse attention with dropout > 0 in training applies the block mask densely (the fast path "
                 "has no attention dropout): its cost is that of dense attention")
