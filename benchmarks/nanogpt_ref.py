"""A nanoGPT-architecture reference model and its CPU training recipe, written here for the benchmark suite (issue 21).

It reproduces the architecture of nanoGPT's `model.py` (GPT-2 style) so that our dense step can be compared with it in
one process, same batch, same machine:

    x = wte(idx) + wpe(pos)                                       learned absolute positions
    x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))                  pre-LayerNorm blocks, LayerNorm with bias
    attn: one Linear(C, 3C, bias) -> causal SDPA -> Linear(C, C, bias)
    mlp:  Linear(C, 4C, bias) -> GELU (exact) -> Linear(4C, C, bias)
    logits = ln_f(x) @ wte^T                                      tied embeddings, cross-entropy over all positions

Init: normal(0, 0.02), the residual output projections normal(0, 0.02 / sqrt(2 L)), biases 0, LayerNorm 1 / 0.
The recipe (nanoGPT's config/train_shakespeare_char.py with its CPU overrides): 4 layers, 4 heads, n_embd 128,
block 64, batch 12, dropout 0, AdamW(lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on matrices only; fused only on
CUDA, so the default foreach kernel on CPU), gradient clipping at 1.0.

Shapes: B batch, T tokens, C n_embd, H heads, D = C / H.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class NanoGPTConfig:
    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True


# nanoGPT's CPU recipe for Shakespeare-char (what `python -m benchmarks.suite --suite nanogpt` runs)
RECIPE = dict(batch_size=12, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, grad_clip=1.0)


class SelfAttention(nn.Module):
    def __init__(self, c: NanoGPTConfig):
        super().__init__()
        self.n_head = c.n_head
        self.dropout = c.dropout
        self.qkv = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, c: NanoGPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.attn = SelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.proj(F.gelu(self.fc(self.ln_2(x)))))


class NanoGPTReference(nn.Module):
    def __init__(self, c: NanoGPTConfig):
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        out_std = 0.02 / math.sqrt(2 * c.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, out_std)
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) -> (logits (B, T, V), loss or None)."""
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-1)
        return logits, loss


def recipe_optimizer(model: nn.Module, fused: bool | None = None) -> torch.optim.AdamW:
    """nanoGPT's AdamW: weight decay on parameters with >= 2 dims, none on biases and LayerNorm weights; fused only on
    CUDA (fused=None), so on CPU the default (foreach) kernel."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": RECIPE["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if fused is None:
        fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=RECIPE["lr"], betas=RECIPE["betas"], **({"fused": True} if fused else {}))
