"""The decoding cache, passed explicitly to `forward` and never stored on the model.

Softmax layers keep keys and values in preallocated buffers (no `torch.cat` per step); lightning layers keep one
recurrent state of shape (B, H, D, D) that does not grow with the context (and, with `short_conv` = K, their last
K-1 projected inputs (B, K-1, 3*H*D)); sparse layers keep keys and values like
softmax layers plus the sum of the keys of each position block (B, Hkv, N, D), updated as keys arrive. The cache
also keeps, per row, which key slots hold real tokens (left padding) and their positions, so every layer sees the
same masks.

Shapes: B batch, Hkv key/value heads, S capacity (slots), D head dim, N position blocks of sparse layers.
"""

from __future__ import annotations

import torch

from minimax_gpt.config import MiniMaxConfig
from minimax_gpt.ops.block_sparse import add_block_sums


class ModelCache:
    def __init__(self, config: MiniMaxConfig, batch_size: int, capacity: int = 256,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32, max_rollback: int = 0):
        """max_rollback: how many past forward calls `crop` can return to in lightning layers. Their state cannot be
        un-decayed, so the cache keeps references to the states at the last max_rollback call boundaries (each
        snapshot costs one (B, H, D, D) state per lightning layer; 0 keeps none)."""
        if max_rollback < 0:
            raise ValueError(f"max_rollback must be >= 0, got {max_rollback}")
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
            softmax = t in ("softmax", "sparse")
            self.keys.append(torch.zeros(kv_shape, dtype=dtype, device=device) if softmax else None)
            self.values.append(torch.zeros(kv_shape, dtype=dtype, device=device) if softmax else None)
        # sparse layers: per-block key sums by position (positions < capacity, so ceil(S / block) blocks)
        sums_shape = (batch_size, config.n_kv_head, self._n_blocks(capacity), config.head_dim)
        self.block_sums: list[torch.Tensor | None] = [
            torch.zeros(sums_shape, dtype=dtype, device=device) if t == "sparse" else None for t in config.layer_types]
        self.states: list[torch.Tensor | None] = [None] * config.n_layer  # (B, H, D, D) float32, lightning layers
        self.conv_states: list[torch.Tensor | None] = [None] * config.n_layer  # (B, K-1, 3*H*D), short_conv only
        self.max_rollback = max_rollback
        # (length, lightning states, short-convolution inputs) at the last forward boundaries, for crop
        self._snapshots: list[tuple[int, list, list]] = [(0, list(self.states), list(self.conv_states))]

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

    def end(self) -> None:
        """Called by the model after a forward: remember the lightning states at this boundary for `crop`."""
        self._snapshots.append((self.length, list(self.states), list(self.conv_states)))
        del self._snapshots[: max(0, len(self._snapshots) - self.max_rollback - 1)]

    def crop(self, length: int) -> None:
        """Forget every token after the first `length` slots (speculative decoding, retries)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop length must be in [0, {self.length}], got {length}")
        if any(t == "lightning" for t in self.config.layer_types):
            found = [(states, convs) for n, states, convs in self._snapshots if n == length]
            if not found:
                kept = [snap[0] for snap in self._snapshots]
                raise ValueError(f"cannot crop lightning states to length {length}: a recurrent state cannot be "
                                 f"rolled back, and snapshots exist only at lengths {kept}; create the cache with a "
                                 f"larger max_rollback (now {self.max_rollback})")
            self.states, self.conv_states = list(found[-1][0]), list(found[-1][1])
        self._snapshots = [snap for snap in self._snapshots if snap[0] <= length]
        self.length = length
        self.next_position = self.key_valid[:, :length].sum(dim=1)  # real tokens so far = next position
        for i, sums in enumerate(self.block_sums):  # sums again over the kept keys (a subtraction would not be exact)
            if sums is not None:
                add_block_sums(sums.zero_(), self.keys[i][:, :, :length], self.key_positions[:, :length],
                               self.key_valid[:, :length], self.config.sparse_block_size)

    def reorder(self, indices: torch.Tensor) -> None:
        """Select / repeat batch rows (beam search): row i becomes old row indices[i], for both cache kinds."""
        indices = torch.as_tensor(indices, dtype=torch.long, device=self.key_valid.device)
        if indices.dim() != 1 or indices.numel() == 0:
            raise ValueError("indices must be a non-empty 1-D tensor of batch rows")
        if bool(((indices < 0) | (indices >= self.batch_size)).any()):
            raise ValueError(f"indices must be in [0, batch_size={self.batch_size})")

        def pick(t):
            return None if t is None else t.index_select(0, indices)

        self.key_valid, self.key_positions = pick(self.key_valid), pick(self.key_positions)
        self.next_position = pick(self.next_position)
        self.keys, self.values = [pick(k) for k in self.keys], [pick(v) for v in self.values]
        self.block_sums = [pick(s) for s in self.block_sums]
        self.states = [pick(s) for s in self.states]
        self.conv_states = [pick(s) for s in self.conv_states]
        self._snapshots = [(n, [pick(s) for s in states], [pick(c) for c in convs])
                           for n, states, convs in self._snapshots]
        self.batch_size = indices.numel()

    def nbytes(self) -> int:
        """Memory held by the cache's tensors."""
        tensors = [self.key_valid, self.key_positions, self.next_position, *self.keys, *self.values, *self.states,
                   *self.conv_states, *self.block_sums]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

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
        n_blocks = self._n_blocks(new_cap)
        self.block_sums = [None if s is None else torch.cat((s, s.new_zeros(*s.shape[:2], n_blocks - s.shape[2],
                                                                            s.shape[3])), dim=2)
                           for s in self.block_sums]
        self.capacity = new_cap

    def _n_blocks(self, capacity: int) -> int:
        return -(-capacity // self.config.sparse_block_size)

    # --- per-layer access --------------------------------------------------------------------------------------
    def update_kv(self, layer_idx: int, offset: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, T, D) at [offset, offset+T) (a sparse layer also adds k to its block sums) and return
        views of all keys/values so far."""
        end = offset + k.shape[2]
        kb, vb = self.keys[layer_idx], self.values[layer_idx]
        kb[:, :, offset:end] = k
        vb[:, :, offset:end] = v
        if self.block_sums[layer_idx] is not None:
            add_block_sums(self.block_sums[layer_idx], k, self.key_positions[:, offset:end],
                           self.key_valid[:, offset:end], self.config.sparse_block_size)
        return kb[:, :, :end], vb[:, :, :end]

    def block_means(self, layer_idx: int) -> torch.Tensor:
        """(B, Hkv, N, D): the mean key of each position block of a sparse layer (complete blocks are exact; the
        gate reads only blocks before a query's own, which are complete)."""
        return self.block_sums[layer_idx] / self.config.sparse_block_size


def new_positions(token_mask: torch.Tensor | None, n_new: int, start: torch.Tensor) -> torch.Tensor:
    """Positions of new tokens (B, T): real tokens count up from `start` per row, so a left-padded row numbers its
    first real token 0 exactly as it would unpadded; padding takes the position of the last real token (or 0)."""
    if token_mask is None:
        return start[:, None] + torch.arange(n_new, device=start.device)
    return (start[:, None] + token_mask.long().cumsum(dim=1) - 1).clamp_min(0)
