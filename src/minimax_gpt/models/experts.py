"""The stacked SwiGLU experts of one MoE layer, as their own module.

Expert e computes w2[e] @ (silu(w1[e] @ x) * (w3[e] @ x)) with w1, w3 (E, I, C) and w2 (E, C, I). The weights live
in a submodule of `MoEFeedForward` (state-dict names `...mlp.experts.w1`, as transformers' and torchtitan's MoE) so
that expert parallelism can shard them apart from the router: over the expert-parallel ranks on dim 0, then with
FSDP2 over the ranks that hold the same experts, while the router follows the data-parallel engine of the rest of
the model (minimax_gpt.parallel.expert).

Without expert parallelism the layer reads the weights directly in its dispatch kernels and never calls this
module. Under it the layer calls the module, so that FSDP2's hooks gather this rank's experts first, and the weights
are DTensors sharded on dim 0 whose local part (`local_weights`) holds experts first .. first + E / ep - 1.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert on rows x (n, C) -> (n, C), in x's dtype: w1, w3 (I, C), w2 (C, I)."""
    dt = x.dtype
    h = F.silu(F.linear(x, w1.to(dt))) * F.linear(x, w3.to(dt))  # (n, I)
    return F.linear(h, w2.to(dt))


def expert_gram(weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The experts' Gram matrix of their flattened weights [w1 | w3 | w2], fp32 (E, E): built per matrix, so no copy
    of the weights is made (for fp32 weights)."""
    E = weights[0].shape[0]
    return sum(w.reshape(E, -1).float() @ w.reshape(E, -1).float().t() for w in weights)


def diversity_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal cosine similarity from a Gram matrix (E, E): 0 for mutually orthogonal experts, 1
    for identical (or sign-flipped) ones; 0 for a single expert."""
    E = gram.shape[0]
    if E < 2:
        return gram.new_zeros(())
    norm = torch.diagonal(gram).clamp(min=1e-12).sqrt()  # (E,)
    cos = gram / (norm[:, None] * norm[None, :])  # (E, E)
    off = 1 - torch.eye(E, dtype=cos.dtype, device=cos.device)  # a mask product, not cos[mask]: no data-dependent shape
    return (cos * off).pow(2).sum() / (E * (E - 1))


class Experts(nn.Module):
    """w1, w3 (E, I, C) and w2 (E, C, I); initialised by `MoEFeedForward.init_weights`."""

    def __init__(self, num_experts: int, n_embd: int, intermediate_size: int):
        super().__init__()
        E, C, I = num_experts, n_embd, intermediate_size
        self.w1 = nn.Parameter(torch.empty(E, I, C))
        self.w3 = nn.Parameter(torch.empty(E, I, C))
        self.w2 = nn.Parameter(torch.empty(E, C, I))

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w3, w2) of the experts this rank holds, as plain tensors (the local part of sharded DTensors;
        gradients flow back to them)."""
        return tuple(w.to_local() if hasattr(w, "to_local") else w for w in (self.w1, self.w3, self.w2))

    def forward(self, rows: torch.Tensor, per_expert: list[int],
                gather: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's experts on rows (R, C) grouped by local expert (per_expert[i] rows for local expert i, in
        order) -> (outputs (R, C), diversity). `gather`, when given, all-gathers a local weight (E_local, ...) into
        (E, ...) with its gradient, and the diversity of all E experts (the loss compares experts that live on
        other ranks) is computed from the gathered weights; else diversity is None."""
        weights = self.local_weights()
        outs, start = [], 0
        for i, n in enumerate(per_expert):
            outs.append(swiglu(rows[start:start + n], weights[0][i], weights[1][i], weights[2][i]))
            start += n
        out = torch.cat(outs) if outs else rows
        diversity = None if gather is None else diversity_from_gram(expert_gram(tuple(gather(w) for w in weights)))
        return out, diversity
