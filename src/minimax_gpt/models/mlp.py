"""The dense feed-forward branch: SwiGLU, w2(silu(w1 x) * w3 x), no biases."""

import torch
import torch.nn.functional as F
from torch import nn

from minimax_gpt.config import MiniMaxConfig


class SwiGLU(nn.Module):
    def __init__(self, config: MiniMaxConfig):
        super().__init__()
        self.w1 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        # Same call shape as the MoE branch: (output, router stats); a dense MLP has no stats.
        return self.w2(F.silu(self.w1(x)) * self.w3(x)), None
