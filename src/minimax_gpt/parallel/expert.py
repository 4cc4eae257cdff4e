"""Expert parallelism: each rank of an expert-parallel group of size W runs E / W of a MoE layer's experts, and the
tokens travel to them and back with all-to-all (GShard, DeepSpeed-MoE, Megatron, torchtitan).

The model routes as always, on its own tokens: top-k (or top-p), the capacity limit and the drop order are decided
where the token is, before anything moves, so exactly the tokens the same run without EP drops are dropped. Then
`ExpertParallel.run`, for one layer:

    1. the kept rows, already sorted by expert, are counted per expert: counts (E,);
    2. one all-to-all of the counts tells each rank how many rows each source sends to each of its E / W experts;
    3. the rows go to their experts' ranks (all_to_all_single with uneven splits), are grouped by local expert, run
       through the expert's SwiGLU, ungrouped, and come back with the inverse all-to-all;
    4. the model combines them with the routing weights exactly as without EP.

Both all-to-alls are autograd Functions whose backward is the reverse exchange, so an expert's weight gradient on
the rank that runs it is the sum over every rank's tokens, and the data-parallel mean then gives the gradient of the
global loss. The router statistics and auxiliary losses come from the local routing and are reduced over ranks as
without EP (`GlobalBatchLoss`).

This step keeps every expert's weights on every rank (replicated by DDP or sharded by FSDP2 as before) and runs
only the local slice of them: the dispatch is exact and tested; holding only E / W experts per rank is the next
step of issue 18.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """Rows x (sum(send), C) -> (sum(recv), C): rows [sum(send[:j]), sum(send[:j+1])) go to rank j, rank i's rows for
    this rank arrive in block i. Backward: the same exchange in reverse."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, recv: list[int], send: list[int], group) -> torch.Tensor:
        ctx.recv, ctx.send, ctx.group = recv, send, group
        out = x.new_empty((sum(recv), x.shape[1]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.send), grad.shape[1]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


class ExpertParallel:
    """This rank's place in an expert-parallel group; `parallelize` installs one on every MoE layer
    (`moe.expert_parallel`) and the layer calls `run` instead of running its experts itself."""

    def __init__(self, group, num_experts: int):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        if num_experts % self.size:
            raise ValueError(f"num_experts = {num_experts} must be divisible by parallel.ep = {self.size}")
        self.local = num_experts // self.size  # experts per rank
        self.first = self.rank * self.local  # this rank's experts are first .. first + local - 1

    def run(self, moe, xs: torch.Tensor, experts: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """xs (A, C): the layer's assignment rows sorted by expert, experts (A,) their expert (E = none), keep (A,)
        whether each row reaches its expert. Returns (A, C): each kept row's expert output, zero elsewhere."""
        W, El = self.size, self.local
        kept = keep.nonzero().squeeze(1)  # (n,) host sync: the rows that travel
        send_rows = xs.index_select(0, kept)  # (n, C), by expert
        counts = torch.bincount(experts.index_select(0, kept), minlength=El * W)  # (E,) rows for each expert
        recv_counts = torch.empty_like(counts)  # (W * El,) [source][local expert]
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        send = counts.view(W, El).sum(1).tolist()
        recv_by = recv_counts.view(W, El)
        recv = recv_by.sum(1).tolist()
        rows = _AllToAll.apply(send_rows, recv, send, self.group)  # (R, C) by source, then local expert
        local_expert = torch.repeat_interleave(torch.arange(El, device=xs.device).repeat(W), recv_by.flatten())
        by_expert = torch.argsort(local_expert, stable=True)  # (R,) by local expert, then source
        out = self._experts(moe, rows.index_select(0, by_expert), recv_by.sum(0).tolist())
        out = out.index_select(0, torch.argsort(by_expert))  # back to source order
        back = _AllToAll.apply(out, send, recv, self.group)  # (n, C) in send_rows' order
        return xs.new_zeros(xs.shape).index_copy(0, kept, back.to(xs.dtype))

    def _experts(self, moe, rows: torch.Tensor, per_expert: list[int]) -> torch.Tensor:
        """The local experts' SwiGLU on their contiguous groups of rows (R, C) -> (R, C)."""
        outs, start = [], 0
        for i, n in enumerate(per_expert):
            outs.append(moe.expert(self.first + i, rows[start:start + n]))
            start += n
        return torch.cat(outs) if outs else rows
