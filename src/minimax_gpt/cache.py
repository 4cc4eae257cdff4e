"""The decoding cache, passed explicitly to `forward` and never stored on the model.

Softmax layers keep keys and values in preallocated buffers (no `torch.cat` per step); lightning layers keep one
recurrent state of shape (B, H, D, D) that does not grow with the context. The cache also keeps, per row, which key
slots hold real tokens (left padding) and their positions, so every layer sees the same masks.

Shapes: B batch, Hkv key/value heads, S capacity (slots), D head dim.
"""

from __future__ import annotations

import torch

from minimax_gpt.config import MiniMaxConfig


class ModelCache:
    def __init__(self, config: MiniMaxConfig, batch_size: int, capacity: int = 256,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.config = config
        self.batch_size = batch_size
        self.capacity = capacity
        self.length = 0  # slots used, padding included; the same for every row
        self.has_padding = False  # set once a forward brings an attention mask
        self.key_valid = torch.ones(batch_size, capacity, dtype=torch.bool, device=device)  # (B, S)
        self.key_positions = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)  # (B, S)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        kv_shape = (batch_size, config.n_kv_head, capacity, config.head_dim)
        # one entry per layer: (k, v) buffers for softmax layers, the recurrent state for lightning layers
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        for t in config.layer_types:
            softmax = t == "softmax"
            self.keys.append(torch.zeros(kv_shape, dtype=dtype, device=device) if softmax else None)
            self.values.append(torch.zeros(kv_shape, dtype=dtype, device=device) if softmax else None)
        self.states: list[torch.Tensor | None] = [None] * config.n_layer  # (B, H, D, D) float32, lightning layers

    # --- bookkeeping, called once per forward by the model ----------------------------------------------------
    def begin(self, token_mask: torch.Tensor | None, n_new: int) -> tuple[int, torch.Tensor]:
        """Register n_new tokens: grow the buffers if needed, record validity and positions.
        Returns the slot offset of the first new token and the new tokens' positions (B, T)."""
        if token_mask is not None and token_mask.shape != (self.batch_size, n_new):
            raise ValueError(f"attention_mask for the new tokens must have shape {(self.batch_size, n_new)}, "
                             f"got {tuple(token_mask.shape)}")
        self._reserve(self.length + n_new)
        offset = self.length
        positions = new_positions(token_mask, n_new, self.next_position)
        sl = slice(offset, offset + n_new)
        self.key_positions[:, sl] = positions
        if token_mask is not None:
            self.key_valid[:, sl] = token_mask
            self.has_padding = True
            self.next_position = self.next_position + token_mask.sum(dim=1)
        else:
            self.next_position = self.next_position + n_new
        self.length += n_new
        return offset, positions

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)

        def grow(t: torch.Tensor | None, dim: int, fill) -> torch.Tensor | None:
            if t is None:
                return None
            shape = list(t.shape)
            shape[dim] = new_cap
            out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
            out.narrow(dim, 0, self.capacity).copy_(t)
            return out

        self.key_valid = grow(self.key_valid, 1, True)
        self.key_positions = grow(self.key_positions, 1, 0)
        self.keys = [grow(k, 2, 0) for k in self.keys]
        self.values = [grow(v, 2, 0) for v in self.values]
        self.capacity = new_cap

    # --- per-layer access --------------------------------------------------------------------------------------
    def update_kv(self, layer_idx: int, offset: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, T, D) at [offset, offset+T) and return views of all keys/values so far."""
        end = offset + k.shape[2]
        kb, vb = self.keys[layer_idx], self.values[layer_idx]
        kb[:, :, offset:end] = k
        vb[:, :, offset:end] = v
        return kb[:, :, :end], vb[:, :, :end]


def new_positions(token_mask: torch.Tensor | None, n_new: int, start: torch.Tensor) -> torch.Tensor:
    """Positions of new tokens (B, T): real tokens count up from `start` per row, so a left-padded row numbers its
    first real token 0 exactly as it would unpadded; padding takes the position of the last real token (or 0)."""
    if token_mask is None:
        return start[:, None] + torch.arange(n_new, device=start.device)
    return (start[:, None] + token_mask.long().cumsum(dim=1) - 1).clamp_min(0)
