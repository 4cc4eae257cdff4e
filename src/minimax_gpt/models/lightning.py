"""The lightning attention layer (MiniMax-01): projections, gate and cache around the ops in `ops/lightning.py`.

    q, k, v = split(silu(x W_qkv^T))              one fused projection, head-major rows [q_h | k_h | v_h]
    o       = lightning(q, k, v, lam)             o_t = sum_{s<=t} exp(-lam (t - s)) (q_t . k_s) v_s, per head
    y       = W_out (RMSNorm(o) * sigmoid(x W_gate^T))

Training and prefill use the chunked kernel; decoding one token uses the recurrence. The cache holds one state per
layer, S = sum_s exp(-lam (t - s)) k_s^T v_s of shape (B, H, D, D) in float32, whatever the context length.
Padding tokens get q = k = v = 0, so they add nothing to the state and a left-padded row equals its unpadded self.

Shapes: B batch, T tokens, H heads, D head dim, C n_embd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimax_gpt.config import MiniMaxConfig
from minimax_gpt.models.context import ForwardContext
from minimax_gpt.models.norm import RMSNorm
from minimax_gpt.ops.lightning import (lightning_attn_chunked, lightning_attn_chunked_packed,
                                       lightning_attn_recurrent, lightning_slopes)
from minimax_gpt.models.rotary import apply_rotary


class LightningAttention(nn.Module):
    def __init__(self, config: MiniMaxConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.chunk_size = config.lightning_chunk_size
        self.use_rope = config.lightning_use_rope and config.rotary_dim > 0
        inner = self.n_head * self.head_dim
        self.qkv_proj = nn.Linear(config.n_embd, 3 * inner, bias=False)
        self.output_gate = nn.Linear(config.n_embd, inner, bias=False)
        self.norm = RMSNorm(inner, eps=1e-6)
        self.out_proj = nn.Linear(inner, config.n_embd, bias=False)
        # decay rates lam per head, fixed by the layer's depth (not learned)
        self.register_buffer("slopes", lightning_slopes(self.n_head, layer_idx, config.n_layer), persistent=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.n_head, self.head_dim
        qkv = F.silu(self.qkv_proj(x))  # (B, T, 3*H*D)
        if ctx.token_mask is not None:
            qkv = qkv * ctx.token_mask[..., None].to(qkv.dtype)
        heads = qkv.view(B, T, H, 3 * D).transpose(1, 2)  # (B, H, T, 3D), a view
        state = ctx.cache.states[self.layer_idx] if ctx.cache is not None else None
        if self.use_rope or (state is not None and T == 1):
            q, k, v = heads.split(D, dim=-1)  # 3 x (B, H, T, D), views
            if self.use_rope:
                cos, sin = ctx.rope
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            if state is not None and T == 1:
                o, state = lightning_attn_recurrent(q, k, v, self.slopes, initial_state=state)
            else:
                o, state = lightning_attn_chunked(q, k, v, self.slopes, initial_state=state,
                                                  chunk_size=self.chunk_size)
        else:  # no rotation: the packed op reads q, k, v in place and writes dqkv in the projection's layout
            o, state = lightning_attn_chunked_packed(heads, self.slopes, initial_state=state,
                                                     chunk_size=self.chunk_size)
        if ctx.cache is not None:
            ctx.cache.states[self.layer_idx] = state
        o = o.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.out_proj(self.norm(o) * torch.sigmoid(self.output_gate(x)))
