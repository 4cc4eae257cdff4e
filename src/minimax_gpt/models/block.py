"""One transformer block: a token mixer chosen by the layer's type, then the feed-forward branch (dense or MoE).

Pre-norm (default):                       MiniMax-01 post-norm (`use_post_layernorm`):
    x = a1 * x + b1 * mix(norm1(x))           h = norm1(x);  x = a1 * h + b1 * mix(h)
    x = a2 * x + b2 * ffn(norm2(x))           h = norm2(x);  x = a2 * h + b2 * ffn(h)
with (a, b) the DeepNorm-style residual factors of the config, chosen per layer type.
"""

from __future__ import annotations

import torch
from torch import nn

from minimax_gpt.models.attention import SoftmaxAttention
from minimax_gpt.config import MiniMaxConfig
from minimax_gpt.models.context import ForwardContext
from minimax_gpt.models.lightning import LightningAttention
from minimax_gpt.models.mlp import SwiGLU
from minimax_gpt.models.moe import MoEFeedForward
from minimax_gpt.models.norm import RMSNorm
from minimax_gpt.models.sparse_attention import SparseAttention

# "sparse" layers use the softmax layers' residual factors (full_attn_*)
MIXERS = {"softmax": SoftmaxAttention, "lightning": LightningAttention, "sparse": SparseAttention}


def make_ffn(config: MiniMaxConfig, layer_idx: int) -> nn.Module:
    if config.use_moe:
        return MoEFeedForward(config, layer_idx)
    return SwiGLU(config)


class EnhancedHybridBlock(nn.Module):
    def __init__(self, config: MiniMaxConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.post_norm = config.use_post_layernorm
        self.norm1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = MIXERS[self.layer_type](config, layer_idx)
        self.norm2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = make_ffn(config, layer_idx)
        self.drop = nn.Dropout(config.dropout)
        prefix = "linear_attn" if self.layer_type == "lightning" else "full_attn"
        self.attn_alpha = getattr(config, f"{prefix}_alpha_factor")
        self.attn_beta = getattr(config, f"{prefix}_beta_factor")
        self.mlp_alpha, self.mlp_beta = config.mlp_alpha_factor, config.mlp_beta_factor

    def forward(self, x: torch.Tensor, ctx: ForwardContext):
        """x (B, T, C) -> (x, router stats or None)."""
        h = self.norm1(x)
        x = residual(h if self.post_norm else x, self.dropout(self.attn(h, ctx)), self.attn_alpha, self.attn_beta)
        h = self.norm2(x)
        m, stats = self.mlp(h, ctx.token_mask)
        x = residual(h if self.post_norm else x, self.dropout(m), self.mlp_alpha, self.mlp_beta)
        return x, stats

    def dropout(self, y: torch.Tensor) -> torch.Tensor:
        """self.drop(y), without the module call when it is the identity (p = 0 or eval): a decode step makes 8."""
        return self.drop(y) if self.drop.p > 0 and self.training else y


def residual(x: torch.Tensor, y: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """alpha * x + beta * y, with no multiplication by a factor of 1 (the default): one pass instead of three."""
    if alpha != 1:
        x = x * alpha
    return x + y if beta == 1 else torch.add(x, y, alpha=beta)
