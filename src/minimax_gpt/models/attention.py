"""Softmax attention with grouped-query heads, RoPE / adaptive XPos and a preallocated KV cache.

Three interchangeable kernels give the same result: `flash_attn` (CUDA, when installed, fp16/bf16, no padding mask),
`torch.nn.functional.scaled_dot_product_attention` (FlashAttention / memory-efficient kernels on GPU, the fused kernel
on CPU), and an explicit math path (`use_flash_attn=False`), which is the reference.

Shapes: B batch, T new tokens, S keys (past + new), H query heads, Hkv key/value heads, D head dim, C n_embd.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from minimax_gpt.config import MiniMaxConfig
from minimax_gpt.models.context import ForwardContext
from minimax_gpt.models.rotary import AdaptiveXPos, apply_rotary

log = logging.getLogger(__name__)
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
_flash_attn_func = None
_flash_attn_checked = False


def _flash_attn():
    """The flash_attn package's kernel, or None (the fallback to SDPA is logged once)."""
    global _flash_attn_func, _flash_attn_checked
    if not _flash_attn_checked:
        _flash_attn_checked = True
        try:
            from flash_attn import flash_attn_func

            _flash_attn_func = flash_attn_func
        except ImportError:
            log.info("flash_attn is not installed; softmax attention uses torch SDPA (its own FlashAttention kernel)")
    return _flash_attn_func


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv * n_rep, S, D), each key/value head shared by n_rep query heads."""
    if n_rep == 1:
        return x
    B, Hkv, S, D = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, S, D).reshape(B, Hkv * n_rep, S, D)


def attention_math(q, k, v, attn_mask, is_causal, dropout_p=0.0, scale=None):
    """The reference: softmax(q k^T * scale + mask) v, softmax in float32. q (B, H, T, D), k/v (B, H, S, D)."""
    T, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)).float() * scale  # (B, H, T, S)
    if is_causal:
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


class SoftmaxAttention(nn.Module):
    def __init__(self, config: MiniMaxConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.use_flash_attn = config.use_flash_attn
        self.dropout = config.dropout
        # one fused projection; rows are [q (H*D) | k (Hkv*D) | v (Hkv*D)]
        self.qkv_proj = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.use_rope = config.rotary_dim > 0
        self.xpos = None
        if config.adaptive_xpos:
            self.xpos = AdaptiveXPos(config.rotary_dim, config.xpos_scale_base, layer_idx, config.n_layer,
                                     config.block_size, adapt=config.xpos_adapt)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv_proj(x)  # (B, T, (H + 2Hkv) * D)
        q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if self.use_rope:
            cos, sin = ctx.rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if ctx.seq is not None:  # sequence parallelism: the keys and values of every slice up to this rank's
            k, v = ctx.seq.gather_kv(k, v)  # (B, Hkv, S, D)
        elif ctx.cache is not None:
            k, v = ctx.cache.update_kv(self.layer_idx, ctx.offset, k, v)  # (B, Hkv, S, D)
        y = self._mix(q, k, v, ctx)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.o_proj(y)

    def _mix(self, q, k, v, ctx: ForwardContext) -> torch.Tensor:
        """Attention of q (B, H, T, D) over all keys so far k, v (B, Hkv, S, D); the sparse layer overrides it."""
        if self.xpos is not None:
            return self._attend_xpos(q, k, v, ctx)
        return self._attend(q, k, v, ctx.attn_mask, ctx.is_causal)

    def _attend(self, q, k, v, attn_mask, is_causal, scale=None):
        """is_causal aligns the mask bottom-right, as `attention_math` and flash_attn do: with S keys and T <= S
        queries, query t sees keys 0 .. S - T + t (a sequence-parallel slice after S - T earlier keys)."""
        dropout_p = self.dropout if self.training else 0.0
        if not self.use_flash_attn:
            return attention_math(q, repeat_kv(k, self.n_head // self.n_kv_head),
                                  repeat_kv(v, self.n_head // self.n_kv_head), attn_mask, is_causal, dropout_p, scale)
        if (q.is_cuda and attn_mask is None and q.dtype in (torch.float16, torch.bfloat16)
                and (is_causal or q.shape[2] == 1) and _flash_attn() is not None):
            # flash_attn takes (B, T, H, D) and handles GQA; with one query token attending to all keys, causal=False.
            out = _flash_attn()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                                softmax_scale=scale, causal=is_causal)
            return out.transpose(1, 2)
        pad = k.shape[2] - q.shape[2] if is_causal else 0
        if pad > 0:
            # SDPA aligns is_causal top-left. Leading zero queries shift ours onto its diagonal (their outputs are
            # dropped): the fused kernel's memory stays linear in S, where a materialised mask would take T x S.
            return self._attend(F.pad(q, (0, 0, pad, 0)), k, v, None, True, scale)[:, :, pad:]
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale,
                                                  enable_gqa=self.n_head != self.n_kv_head)
        n_rep = self.n_head // self.n_kv_head
        return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=attn_mask,
                                              dropout_p=dropout_p, is_causal=is_causal, scale=scale)

    def _attend_xpos(self, q, k, v, ctx: ForwardContext):
        """XPos scales the rotated dims of q and k relative to the query span (see rotary.py); the scaled tensors are
        kept in float32 (float64 for float64 inputs) so that positions far from the reference stay finite in fp16/bf16."""
        q_scale, k_scale = self.xpos.xpos_scales(ctx.positions, ctx.key_positions)  # (B,1,T,R), (B,1,S,R)
        R = q_scale.shape[-1]
        dtype, cdt = q.dtype, torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
        q = torch.cat((q[..., :R] * q_scale.to(cdt), q[..., R:]), dim=-1)
        k = torch.cat((k[..., :R] * k_scale.to(cdt), k[..., R:]), dim=-1)
        return self._attend(q, k, v, ctx.attn_mask, ctx.is_causal).to(dtype)
