"""Sequence parallelism: every sequence split into `sp` contiguous slices, one per rank of the sequence-parallel group.

Lightning layers follow LASP-2 (arXiv 2502.07563). The state after position t of a layer's recurrence is
S_t = lam S_{t-1} + k_t^T v_t per head, so a slice of C_r tokens that starts from the state S_r entering it ends at

    lam^{C_r} S_r + M_r,        M_r = sum_j lam^{C_r - 1 - j} k_j^T v_j        (B, H, D, Dv), from the slice alone.

Each rank forms its M_r, the M of all ranks are all-gathered once per layer (sp * B * H * D * Dv values, whatever the
sequence length), and rank r folds those of the ranks before it into S_r = lam^{C_{r-1}} (... ) + M_{r-1} (the exact
decays across the slices), then runs the ordinary chunked op on its slice from S_r: its output and final state are
those of the whole sequence at its positions. Backward mirrors it: the gradient of every rank's S_r reaches the M of
the ranks before it through the all-gather's backward (an all-reduce of the sp states' gradients).

Softmax layers gather keys and values (only the key/value heads, so GQA sends Hkv heads) along the sequence; rank r
keeps the keys up to the end of its slice (causal: later keys are masked anyway) and its queries attend them at
their global positions. The gradients of the gathered keys and values are summed over the group and each rank keeps
its slice's.

Everything else is per token and needs no exchange: the loss and the MoE statistics are reduced over every rank
(data- and sequence-parallel alike) by `GlobalBatchLoss`, and parameters are replicated over the group, their
gradients averaged by the data-parallel engine over the flattened (data, sequence) ranks.

`SequenceParallel` is the handle `parallelize` installs on the model (`model.sequence_parallel`); the model never
imports torch.distributed, it only calls the handle's methods. `lightning_attn_sequence_parallel` is the op on its
own; its reference is the single-process op over the whole sequence (tests/parallel/test_sequence.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from minimax_gpt.parallel.collectives import SENT_BYTES, AllGather, all_gather_flat


def slice_memory(k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """M = sum_j lam^{C-1-j} k_j^T v_j of one slice, in float32 (float64 for float64 inputs), as the op's state:
    k (B, H, C, D), v (B, H, C, Dv) -> (B, H, D, Dv)."""
    C, dtype = k.shape[2], torch.promote_types(k.dtype, torch.float32)
    age = torch.arange(C - 1, -1, -1, device=k.device, dtype=dtype)  # (C,) tokens after j in the slice
    weight = torch.exp(-slopes.to(dtype)[:, None] * age)  # (H, C)
    return torch.einsum("bhcd,bhce->bhde", k.to(dtype) * weight[None, :, :, None], v.to(dtype))


def fold_states(memories: torch.Tensor, lengths: list[int], slopes: torch.Tensor, upto: int,
                initial_state: torch.Tensor | None = None) -> torch.Tensor:
    """The state entering slice `upto`: the memories (W, B, H, D, Dv) of the slices before it, each decayed by
    lam^{tokens between its slice's end and slice `upto`}, plus `initial_state` (B, H, D, Dv) decayed over every token
    before slice `upto`; in the memories' dtype. One weighted sum over `memories[:upto]`, so every rank's result
    depends on the gathered tensor (rank 0's through an empty slice) and every rank joins the gather's backward."""
    dtype, H = memories.dtype, slopes.shape[0]
    after = torch.tensor([sum(lengths[r + 1: upto]) for r in range(upto)], dtype=dtype, device=memories.device)
    weights = torch.exp(-slopes.to(dtype)[None, :] * after[:, None])  # (upto, H)
    state = torch.einsum("wh,wbhde->bhde", weights, memories[:upto])
    if initial_state is not None:
        before = torch.exp(-slopes.to(dtype) * sum(lengths[:upto])).view(1, H, 1, 1)
        state = state + before * initial_state.to(dtype)
    return state


class SequenceParallel:
    """This rank's place in the sequence-parallel group and the exchanges the model's layers call. `begin(T)` is
    called once per forward (one tiny all-gather of the slice lengths); the layers then call `lightning_state` and
    `gather_kv` in the same order on every rank."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.lengths: list[int] = []

    @property
    def offset(self) -> int:
        """Global position of this rank's first token (after `begin`)."""
        return sum(self.lengths[: self.rank])

    def begin(self, T: int, device: torch.device) -> int:
        """Learn every rank's slice length; returns this rank's offset."""
        mine = torch.tensor([T], dtype=torch.long, device=device)
        every = mine.new_empty(self.size)
        all_gather_flat(every, mine, group=self.group)
        self.lengths = every.tolist()
        return self.offset

    def lightning_state(self, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                        initial_state: torch.Tensor | None = None) -> torch.Tensor:
        """The state (B, H, D, Dv) entering this rank's slice, from every rank's slice memory (one all-gather)."""
        memories = AllGather.apply(slice_memory(k, v, slopes), self.group, "lightning")  # (W, B, H, D, Dv)
        return fold_states(memories, self.lengths, slopes, self.rank, initial_state)

    def gather_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, Hkv, C, D) of every rank's slice -> those up to the end of this rank's slice,
        (B, Hkv, offset + C, D). Slices must have equal lengths (the data loader splits evenly)."""
        if len(set(self.lengths)) != 1:
            raise ValueError(f"softmax layers under sequence parallelism need equal slices; got {self.lengths}")
        end = self.offset + k.shape[2]
        kv = torch.stack((k, v))  # (2, B, Hkv, C, D): one collective for both
        every = AllGather.apply(kv, self.group, "softmax")  # (W, 2, B, Hkv, C, D)
        every = every.permute(1, 2, 3, 0, 4, 5).flatten(3, 4)[:, :, :, :end]  # (2, B, Hkv, end, D)
        return every[0], every[1]


def lightning_attn_sequence_parallel(q, k, v, slopes, sp: SequenceParallel, initial_state=None, chunk_size=64):
    """The lightning op on this rank's slice of a sequence split over `sp`'s group: (output (B, H, C, Dv), the state
    after the slice (B, H, D, Dv)), equal to the single-process op's at these positions. `initial_state` is the state
    before the whole sequence (the same on every rank), or None."""
    from minimax_gpt.ops.lightning import lightning_attn_chunked

    sp.begin(q.shape[2], q.device)
    state = sp.lightning_state(k, v, slopes, initial_state)
    return lightning_attn_chunked(q, k, v, slopes, initial_state=state, chunk_size=chunk_size)
