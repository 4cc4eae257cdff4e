"""A short causal depthwise convolution over time (`config.short_conv`): each channel mixes its own last K inputs,

    y_t[c] = sum_{j=0}^{K-1} w[c, j] * x_{t-K+1+j}[c]          (x_s = 0 before the first token)

Lightning layers apply it to their q, k, v projections when `short_conv` > 0, as Zoology (arXiv 2312.04927) and
Mamba do before their linear mixers: a lightning head's decay is fixed, so without it no head can attend to exactly
the previous token, and multi-query associative recall needs that binding step (docs/recall.md).

Written as K shifted multiply-adds rather than `conv1d`, so a step that sees the last K-1 inputs from the cache
computes each output with the same operations, in the same order, as a full forward: decoding equals it exactly.

Shapes: B batch, T new tokens, C channels, K kernel size.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ShortConv(nn.Module):
    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        if kernel_size < 2:
            raise ValueError(f"a short convolution needs kernel_size >= 2, got {kernel_size}")
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))  # (C, K); tap K-1 is the current token
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float | None = None, out_std: float | None = None) -> None:
        """uniform(+-1/sqrt(K)): PyTorch's Conv1d default for a depthwise kernel, as Zoology and Mamba use it."""
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C); past (B, K-1, C): the inputs before x (None: zeros, the sequence starts here).
        Returns y (B, T, C) and the last K-1 inputs (B, K-1, C), the `past` of the next call."""
        B, T, C = x.shape
        K = self.kernel_size
        if past is None:
            past = x.new_zeros(B, K - 1, C)
        window = torch.cat((past.to(x.dtype), x), dim=1)  # (B, K-1+T, C)
        w = self.weight.to(x.dtype)
        y = window[:, :T] * w[:, 0]
        for j in range(1, K):
            y = y + window[:, j:j + T] * w[:, j]
        return y, window[:, T:].clone()  # a copy: the cache must not hold the whole window alive
