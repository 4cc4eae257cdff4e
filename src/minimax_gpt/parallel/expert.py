"""Expert parallelism: each rank of an expert-parallel group of size W holds and runs E / W of a MoE layer's experts,
and the tokens travel to them and back with all-to-all (GShard, DeepSpeed-MoE, Megatron, torchtitan).

The model routes as always, on its own tokens: top-k (or top-p), the capacity limit and the drop order are decided
where the token is, before anything moves, so exactly the tokens the same run without EP drops are dropped. Then
`ExpertParallel.run`, for one layer:

    1. the kept rows, already sorted by expert, are counted per expert: counts (E,);
    2. one all-to-all of the counts tells each rank how many rows each source sends to each of its E / W experts;
    3. the rows go to their experts' ranks (all_to_all_single with uneven splits), are grouped by local expert, run
       through the layer's `experts` module (this rank's experts only), ungrouped, and come back with the inverse
       all-to-all;
    4. the model combines them with the routing weights exactly as without EP.

Both all-to-alls are autograd Functions whose backward is the reverse exchange, so an expert's weight gradient on
the rank that holds it is the sum over its group's tokens. The router statistics and auxiliary losses come from the
local routing and are reduced over ranks as without EP (`GlobalBatchLoss`); the diversity loss, which compares every
pair of experts, all-gathers the experts' weights inside the exchange (its backward sums the ranks' gradients).

Where the weights live (`ExpertParallel.install`, then `fully_shard_experts`): the expert mesh is (ep_dp, ep), with
the ep ranks of a group consecutive. `w1, w3, w2` become DTensors sharded on dim 0 over `ep` (global shape (E, ...),
each rank holds experts first .. first + E / W - 1), and FSDP2 shards them further over `ep_dp`, the ranks that hold
the same experts; the router and the rest of the model follow the data-parallel engine over every rank. The expert
gradient FSDP2 reduces over `ep_dp` is divided by the world size, not by |ep_dp|: with the all-to-all's sum over the
group, that is the mean over all ranks of their gradients, which is what the data-parallel mean of the replicated
parameters is. Checkpoints store the global (E, ...) tensors (DCP), so they reshard across ep degrees and load in
one process.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist

from minimax_gpt.parallel.collectives import AllGather, AllToAll


class ExpertParallel:
    """This rank's place in an expert-parallel group; `install` puts one on a MoE layer (`moe.expert_parallel`), and
    the layer calls `run` instead of running its experts itself."""

    def __init__(self, mesh, num_experts: int):
        """mesh: the 1-D device mesh of the expert-parallel group."""
        self.mesh, self.size = mesh, mesh.size()
        if num_experts % self.size:
            raise ValueError(f"num_experts = {num_experts} must be divisible by parallel.ep = {self.size}")
        self.group, self.rank = mesh.get_group(), mesh.get_local_rank()
        self.local = num_experts // self.size  # experts per rank
        self.first = self.rank * self.local  # this rank's experts are first .. first + local - 1

    @classmethod
    def install(cls, moe, mesh) -> "ExpertParallel":
        """Keep only this rank's experts of `moe` (its weights become DTensors sharded on dim 0 over `mesh`, from the
        local slice: no communication, the weights must be equal on every rank) and route its layer through them."""
        from torch import nn
        from torch.distributed.tensor import DTensor, Shard

        handle = cls(mesh, moe.num_experts)
        for name in ("w1", "w3", "w2"):
            w = getattr(moe.experts, name)
            local = w.detach()[handle.first:handle.first + handle.local].clone()
            setattr(moe.experts, name, nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False),
                                                    requires_grad=w.requires_grad))
        moe.expert_parallel = handle
        return handle

    def run(self, moe, xs: torch.Tensor, experts: torch.Tensor, keep: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """xs (A, C): the layer's assignment rows sorted by expert, experts (A,) their expert (E = none), keep (A,)
        whether each row reaches its expert. Returns ((A, C): each kept row's expert output, zero elsewhere; the
        diversity of all experts when the layer trains it, else None)."""
        W, El = self.size, self.local
        kept = keep.nonzero().squeeze(1)  # (n,) host sync: the rows that travel
        send_rows = xs.index_select(0, kept)  # (n, C), by expert
        counts = torch.bincount(experts.index_select(0, kept), minlength=El * W)  # (E,) rows for each expert
        recv_counts = torch.empty_like(counts)  # (W * El,) [source][local expert]
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        send = counts.view(W, El).sum(1).tolist()
        recv_by = recv_counts.view(W, El)
        recv = recv_by.sum(1).tolist()
        rows = AllToAll.apply(send_rows, recv, send, self.group, "experts")  # (R, C) by source, then local expert
        local_expert = torch.repeat_interleave(torch.arange(El, device=xs.device).repeat(W), recv_by.flatten())
        by_expert = torch.argsort(local_expert, stable=True)  # (R,) by local expert, then source
        gather = self._gather if moe.diversity_grad else None
        out, diversity = moe.experts(rows.index_select(0, by_expert), recv_by.sum(0).tolist(), gather)
        out = out.index_select(0, torch.argsort(by_expert))  # back to source order
        back = AllToAll.apply(out, send, recv, self.group, "experts")  # (n, C) in send_rows' order
        return xs.new_zeros(xs.shape).index_copy(0, kept, back.to(xs.dtype)), diversity

    def _gather(self, w: torch.Tensor) -> torch.Tensor:
        """This rank's experts' weight (E / W, ...) -> every expert's (E, ...), with its gradient."""
        return AllGather.apply(w, self.group, "experts").flatten(0, 1)


def fully_shard_experts(model, mesh, world_size: int) -> None:
    """FSDP2 on every expert-parallel layer's `experts` over `mesh`, the ranks holding the same experts (before the
    blocks are sharded, so the experts are their own group). Their gradients are summed over `mesh` and divided by
    the world size (see the module docstring). gloo has no pre-scaled sum, so over two or more ranks FSDP2 is told
    to sum and divide after; over one rank it only divides (torch 2.13 would divide twice there when told to sum)."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if getattr(module, "expert_parallel", None) is not None:
            fully_shard(module.experts, mesh=mesh)
            module.experts.set_gradient_divide_factor(float(world_size))
            if mesh.size() > 1:
                module.experts.set_force_sum_reduction_for_comms(True)


@contextlib.contextmanager
def quiet_redistribution():
    """Silence torch's advice, logged on every rank at every call, that gathering a DTensor over both dimensions of
    the (ep_dp, ep) mesh takes two collectives instead of one (gradient norms, full state dicts): it cannot be
    followed here, since the experts' FSDP shards are strided (not in ascending rank order)."""
    log = logging.getLogger("torch.distributed.tensor._redistribute")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
