"""What one forward call sees of the sequence: positions, padding, the causal mask and the cache.

Built once per forward by the model and shared by every layer, so masks and rotary tables are not rebuilt per layer.
Shapes: B batch, T new tokens, S all keys so far (past + new), R rotary dims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from minimax_gpt.models.cache import ModelCache, new_positions


@dataclass
class ForwardContext:
    positions: torch.Tensor  # (B, T) positions of the new tokens
    key_positions: torch.Tensor  # (B, S) positions of all keys
    token_mask: torch.Tensor | None  # (B, T) bool, True = real token; None = no padding
    attn_mask: torch.Tensor | None  # (B or 1, 1, T, S) bool, True = may attend; None with is_causal or one query
    is_causal: bool  # no padding and no past (or a sequence-parallel slice): causal, aligned bottom-right
    offset: int  # slot of the first new token in the cache (0 without a cache)
    cache: ModelCache | None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin (B, 1, T, R)
    # sequence parallelism: this rank holds one slice of each sequence; the layers exchange through this handle
    # (minimax_gpt.parallel.sequence.SequenceParallel; the model never imports torch.distributed)
    seq: Any = None


def build_context(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  cache: ModelCache | None, seq: Any = None) -> ForwardContext:
    B, T = input_ids.shape
    device = input_ids.device
    if seq is not None:
        return _slice_context(B, T, attention_mask, seq, device)
    if cache is not None:
        if cache.batch_size != B:
            raise ValueError(f"cache was made for batch size {cache.batch_size}, input_ids has batch size {B}")
        if attention_mask is not None and attention_mask.shape[1] == cache.length + T and cache.length > 0:
            attention_mask = attention_mask[:, -T:]  # a mask over past + new tokens: the past is in the cache
        offset, positions = cache.begin(attention_mask, T)
        key_valid = cache.key_valid[:, : offset + T] if cache.has_padding else None
        key_positions = cache.key_positions[:, : offset + T]
    else:
        offset = 0
        positions = new_positions(attention_mask, T, torch.zeros(B, dtype=torch.long, device=device))
        key_valid, key_positions = attention_mask, positions
    attn_mask, is_causal = causal_mask(T, offset, key_valid, device)
    return ForwardContext(positions, key_positions, attention_mask, attn_mask, is_causal, offset, cache)


def _slice_context(B: int, T: int, attention_mask, seq, device) -> ForwardContext:
    """This rank's slice of T tokens at global positions offset .. offset + T - 1; its queries see the gathered keys
    0 .. offset + T - 1 causally (is_causal with more keys than queries: the mask aligned bottom-right)."""
    if attention_mask is not None:
        raise ValueError("attention_mask (padding) is not supported under sequence parallelism (parallel.sp > 1)")
    offset = seq.begin(T, device)
    key_positions = torch.arange(offset + T, device=device).expand(B, -1)  # (B, S)
    return ForwardContext(key_positions[:, offset:], key_positions, None, None, True, 0, None, seq=seq)


def causal_mask(T: int, offset: int, key_valid: torch.Tensor | None, device) -> tuple[torch.Tensor | None, bool]:
    """Boolean mask (B or 1, 1, T, S): query t (slot offset+t) sees slots <= its own that hold real tokens.
    A padding query sees itself, so no softmax row is empty (its output is never used)."""
    if key_valid is None and (offset == 0 or T == 1):  # no mask to build (decoding: one query sees every key)
        return None, offset == 0
    S = offset + T
    q_idx = offset + torch.arange(T, device=device)  # (T,)
    k_idx = torch.arange(S, device=device)  # (S,)
    if key_valid is None:
        return (k_idx[None, :] <= q_idx[:, None])[None, None], False
    allowed = (k_idx[None, :] <= q_idx[:, None])[None]  # (1, T, S)
    allowed = allowed & (key_valid[:, None, :] | (k_idx[None, None, :] == q_idx[None, :, None]))  # (B, T, S)
    return allowed[:, None], False
