"""Sums over data-parallel ranks for state every rank must hold identically (the MoE routing bias's expert counts).

Kept apart from `distributed` (the process group, mesh and parallelize) because the model-facing training code needs
only this one collective."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a detached tensor (one all_reduce); `t` itself when there is no group of two or more.
    Every rank gets the same bits (the all_reduce result), so a state updated from it stays equal across ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
