"""The lightning attention layer (MiniMax-01): projections, gate and cache around the ops in `ops/lightning/`.

    q, k, v = split(silu(x W_qkv^T))              one fused projection, head-major rows [q_h | k_h | v_h]
              (with config.short_conv = K > 0: silu(conv_K(x W_qkv^T)), a causal depthwise convolution over the
              last K tokens, models/short_conv.py)
    o       = lightning(q, k, v, lam)             o_t = sum_{s<=t} exp(-lam (t - s)) (q_t . k_s) v_s, per head
    y       = W_out (RMSNorm(o) * sigmoid(x W_gate^T))

Training and prefill use the chunked op; decoding one token uses the recurrence. Both run either in PyTorch or as
Triton kernels, as `config.lightning_backend` and the device decide (ops/lightning/backend.py, logged once per
device). The cache holds one state per
layer, S = sum_s exp(-lam (t - s)) k_s^T v_s of shape (B, H, D, D) in float32, whatever the context length, and with
a short convolution the last K-1 projected inputs (B, K-1, 3*H*D).
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
from minimax_gpt.ops.lightning.backend import lightning_backend, requested_backend, triton_ops
from minimax_gpt.ops.lightning.inputs import triton_unsupported
from minimax_gpt.models.rotary import apply_rotary
from minimax_gpt.models.short_conv import ShortConv


class LightningAttention(nn.Module):
    def __init__(self, config: MiniMaxConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.chunk_size = config.lightning_chunk_size
        self.backend = requested_backend(config.lightning_backend)  # "auto", "torch" or "triton"
        if self.backend == "triton" and (why := triton_unsupported(self.chunk_size, self.head_dim)):
            raise ValueError(f"lightning_backend='triton': {why}")
        self.use_rope = config.lightning_use_rope and config.rotary_dim > 0
        inner = self.n_head * self.head_dim
        self.qkv_proj = nn.Linear(config.n_embd, 3 * inner, bias=False)
        self.short_conv = ShortConv(3 * inner, config.short_conv) if config.short_conv else None
        self.output_gate = nn.Linear(config.n_embd, inner, bias=False)
        self.norm = RMSNorm(inner, eps=1e-6)
        self.out_proj = nn.Linear(inner, config.n_embd, bias=False)
        # decay rates lam per head, fixed by the layer's depth (not learned)
        self.register_buffer("slopes", lightning_slopes(self.n_head, layer_idx, config.n_layer), persistent=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.n_head, self.head_dim
        qkv = self.qkv_proj(x)  # (B, T, 3*H*D)
        if self.short_conv is not None:
            qkv = self._convolve(qkv, ctx)
        qkv = F.silu(qkv)
        if ctx.token_mask is not None:
            qkv = qkv * ctx.token_mask[..., None].to(qkv.dtype)
        heads = qkv.view(B, T, H, 3 * D).transpose(1, 2)  # (B, H, T, 3D), a view
        state = ctx.cache.states[self.layer_idx] if ctx.cache is not None else None
        use_triton = lightning_backend(self.backend, x.device.type, self.chunk_size, D) == "triton"
        q, k, v = heads.split(D, dim=-1)  # 3 x (B, H, T, D), views
        if self.use_rope:
            cos, sin = ctx.rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if ctx.seq is not None:  # sequence parallelism: the state entering this rank's slice (parallel/sequence.py)
            state = ctx.seq.lightning_state(k, v, self.slopes)
        if self.use_rope or (state is not None and T == 1) or use_triton:
            o, state = self._attend(q, k, v, state, use_triton)
        else:  # no rotation: the packed op reads q, k, v in place and writes dqkv in the projection's layout
            o, state = lightning_attn_chunked_packed(heads, self.slopes, initial_state=state,
                                                     chunk_size=self.chunk_size)
        if ctx.cache is not None:
            ctx.cache.states[self.layer_idx] = state
        o = o.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.out_proj(self.norm(o) * torch.sigmoid(self.output_gate(x)))

    def _convolve(self, qkv: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The short convolution of the projections qkv (B, T, 3*H*D), continuing from the cached last inputs.
        Padding is zeroed first, so a left-padded row sees zeros before its first token, as unpadded."""
        if ctx.seq is not None:
            raise NotImplementedError("short_conv is not supported under sequence parallelism (parallel.sp > 1): "
                                      "a slice's first tokens would need the previous rank's last inputs; set "
                                      "short_conv=0 or parallel.sp=1")
        if ctx.token_mask is not None:
            qkv = qkv * ctx.token_mask[..., None].to(qkv.dtype)
        past = ctx.cache.conv_states[self.layer_idx] if ctx.cache is not None else None
        qkv, past = self.short_conv(qkv, past)
        if ctx.cache is not None:
            ctx.cache.conv_states[self.layer_idx] = past
        return qkv

    def _attend(self, q, k, v, state, use_triton: bool):
        """(o (B, H, T, D), final state) of q, k, v (B, H, T, D): the recurrence for one decoded token, else the
        chunked op; through the Triton kernels or PyTorch. The Triton recurrence has no backward, so a decoding step
        that is differentiated runs the chunked kernels (the same values)."""
        decode = state is not None and q.shape[2] == 1
        if use_triton:
            ops = triton_ops()
            if decode and not (torch.is_grad_enabled() and q.requires_grad):
                return ops.lightning_attn_triton_recurrent(q, k, v, self.slopes, initial_state=state)
            return ops.lightning_attn_triton(q, k, v, self.slopes, initial_state=state, chunk_size=self.chunk_size)
        if decode:
            return lightning_attn_recurrent(q, k, v, self.slopes, initial_state=state)
        return lightning_attn_chunked(q, k, v, self.slopes, initial_state=state, chunk_size=self.chunk_size)
