"""MiniMax-01's per-head decay rates and the decay tensors of one chunk."""

from __future__ import annotations

import torch


def lightning_slopes(n_head: int, layer_idx: int, n_layer: int) -> torch.Tensor:
    """Decay rates lam of one layer, (H,) float32: ``2^(-8(h+1)/H) * (1 - l/(L-1+1e-5) + 1e-5)``.

    ``layer_idx`` counts all layers (softmax ones too), as in MiniMax-01. The last layer decays
    almost not at all (factor 1e-5 + tiny), the first one the most.
    """
    if n_head < 1:
        raise ValueError(f"n_head must be >= 1, got {n_head}")
    if n_layer < 1:
        raise ValueError(f"n_layer must be >= 1, got {n_layer}")
    if not 0 <= layer_idx < n_layer:
        raise ValueError(f"layer_idx must be in [0, {n_layer}), got {layer_idx}")
    exponent = torch.arange(1, n_head + 1, dtype=torch.float64)
    base = 2.0 ** (-8.0 * exponent / n_head)  # (H,)
    factor = 1.0 - layer_idx / (n_layer - 1 + 1e-5) + 1e-5
    return (base * factor).to(torch.float32)

def chunk_decays(lam: torch.Tensor, C: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decay tensors of one chunk of C tokens, for lam (H, 1, 1) in the compute dtype.

    Returns
      mask:        (H, C, C)  exp(-lam (i - j)) for j <= i, else 0    (intra-chunk)
      query_decay: (H, C, 1)  exp(-lam (i + 1))                      (carried state -> position i)
      key_decay:   (H, C, 1)  exp(-lam (C - 1 - j))                  (position j -> end of chunk)
      chunk_decay: (H, 1, 1)  exp(-lam C)                            (state across a whole chunk)
    """
    pos = torch.arange(C, device=lam.device, dtype=lam.dtype)
    dist = pos[:, None] - pos[None, :]  # (C, C)
    mask = torch.exp(-lam * dist.clamp(min=0)) * (dist >= 0)
    query_decay = torch.exp(-lam * (pos + 1).view(C, 1))
    key_decay = torch.exp(-lam * (C - 1 - pos).view(C, 1))
    chunk_decay = torch.exp(-lam * C)
    return mask, query_decay, key_decay, chunk_decay

